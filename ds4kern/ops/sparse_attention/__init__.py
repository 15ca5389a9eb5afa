"""sparse_attention: DeepSeek-V4 sparse decode / prefill attention with an attention sink, over a
pool of bf16 or FP8 KV rows; and the FP8 row codec."""

from ...core.registry import add_builtin
from . import variants
from .api import OP, SparseAttentionArgs, SparseAttentionProblem, sparse_attention
from .fp8 import pack_kv_fp8, unpack_kv_fp8
from .kernels import split_k_plan, split_k_scratch_bytes
from .reference import reference_pack_kv_fp8, reference_sparse_attention, reference_unpack_kv_fp8
from .slots import decode_slots, reference_decode_slots

add_builtin(variants)

__all__ = ["sparse_attention", "pack_kv_fp8", "unpack_kv_fp8", "SparseAttentionArgs", "SparseAttentionProblem", "OP",
           "split_k_plan", "split_k_scratch_bytes", "reference_sparse_attention", "reference_pack_kv_fp8",
           "reference_unpack_kv_fp8", "decode_slots", "reference_decode_slots"]
