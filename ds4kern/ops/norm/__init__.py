"""norm: rms_norm and rope_rotate, the row operations of a DeepSeek-V4 block, one launch each."""

from ...core.registry import add_builtin
from . import variants
from .api import RMS_OP, ROPE_OP, NormProblem, rms_norm, rope_rotate
from .reference import reference_rms_norm, reference_rope_rotate

add_builtin(variants)

__all__ = ["rms_norm", "rope_rotate", "NormProblem", "RMS_OP", "ROPE_OP", "reference_rms_norm",
           "reference_rope_rotate"]
