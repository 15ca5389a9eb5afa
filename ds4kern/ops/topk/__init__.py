"""topk_rows: the k largest scores of each row of a matrix (radix select on the GPU)."""

from ...core.registry import add_builtin
from . import variants
from .api import OP, TopkArgs, TopkProblem, topk_rows
from .kernels import radix_plan, scratch_bytes
from .reference import order_keys, reference_topk_rows

add_builtin(variants)

__all__ = ["topk_rows", "TopkArgs", "TopkProblem", "OP", "radix_plan", "scratch_bytes", "order_keys",
           "reference_topk_rows"]
