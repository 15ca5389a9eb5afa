"""indexer_topk: DeepSeek-V4's lightning indexer (logits of the compressed keys, then the top-k of
each query token through topk_rows)."""

from ...core.registry import add_builtin
from . import variants
from .api import OP, IndexerArgs, IndexerProblem, indexer_topk
from .kernels import logits_scratch_bytes, mma_plan, mma_smem
from .reference import TopkReport, check_topk, reference_indexer_logits, reference_indexer_topk

add_builtin(variants)

__all__ = ["indexer_topk", "IndexerArgs", "IndexerProblem", "OP", "logits_scratch_bytes", "mma_plan", "mma_smem",
           "reference_indexer_logits", "reference_indexer_topk", "check_topk", "TopkReport"]
