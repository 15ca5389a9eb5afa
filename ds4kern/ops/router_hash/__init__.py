"""router_hash: hash-routed layers (DeepSeek-V4 layers 0-2)."""

from ...core.registry import add_builtin
from . import variants
from .api import OP, RouterHashArgs, RouterHashProblem, router_hash
from .reference import reference_router_hash

add_builtin(variants)

__all__ = ["router_hash", "RouterHashArgs", "RouterHashProblem", "OP", "reference_router_hash"]
