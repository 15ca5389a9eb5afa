"""router_topk (compact form): the public op, its problem, reference, variants and rule.

- ``api.py``: :func:`router_topk`, :class:`RouterProblem`, :class:`RouterArgs`, validation
- ``reference.py``: the numpy reference (float32 arithmetic); ``checks.py``: float64 oracles
- ``kernels.py``: sources under ``cuda_src/router/`` and their instantiations
- ``variants.py``: launchers, ``supports``, registration; ``rule.py``: the static dispatch rule
"""

from ...core.registry import add_builtin
from . import variants
from .api import OP, RouterArgs, RouterProblem, bucket_tokens, router_topk
from .kernels import group_lanes
from .reference import order_keys, reference_router_topk, score, topk_by_key

add_builtin(variants)

__all__ = ["router_topk", "RouterArgs", "RouterProblem", "OP", "bucket_tokens", "group_lanes", "order_keys",
           "reference_router_topk", "score", "topk_by_key"]
