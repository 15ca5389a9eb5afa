"""expert_mlp: the routed experts' clamped SwiGLU MLPs (DeepSeek-V4) over rows grouped by expert."""

from ...core.registry import add_builtin
from . import linear, variants
from .api import OP, ExpertMlpArgs, ExpertMlpProblem, expert_mlp
from .linear import grouped_linear, grouped_rows
from .kernels import default_tokens_per_group, grouped_smem, item_bound
from .reference import check_offsets, reference_expert_mlp, swiglu

add_builtin(variants)
add_builtin(linear)

__all__ = ["expert_mlp", "grouped_linear", "grouped_rows", "ExpertMlpArgs", "ExpertMlpProblem", "OP", "default_tokens_per_group", "grouped_smem",
           "item_bound", "check_offsets", "reference_expert_mlp", "swiglu"]
