"""The router_te ops' kernel sources (``cuda_src/router_te/``) and their instantiations."""

from __future__ import annotations

from ...core import kernels
from ...core.kernels import C_TYPES
from ..router.kernels import NAIVE_MAX_E, NAIVE_VPL

MAP_KIND = {"bytemap": 1, "bitmap": 2, "indices": 3}  # DS4_MAP_BYTES / _BITS / _INDICES
TE_WARPS = 4  # warps (tokens) per block, DS4_DENSE_WARPS
AUX_VPL = tuple(v for v in NAIVE_VPL if v <= 32)  # one selection bit per register slot
DENSE_MAX_E = NAIVE_MAX_E
BACKWARD_IDX_SEG = (16, 32)  # lanes per token (32 / seg rows per warp)


def dense_name(dtype: str, vpl: int) -> str:
    return f"router_topk_dense_naive<{C_TYPES[dtype]}, {vpl}>"


def backward_name(dtype: str, vec: int) -> str:
    return f"router_topk_backward_naive<{C_TYPES[dtype]}, {vec}>"


def backward_idx_name(dtype: str, seg: int) -> str:
    """Backward from dense indices, a segment of ``seg`` lanes per token (not softmax pre)."""
    return f"router_topk_backward_idx<{C_TYPES[dtype]}, {seg}>"


def backward_idx_seg(dtype: str, k: int) -> int:
    """Lanes per token of the dense-index backward.  From bench/router_te/PERFORMANCE.md (H100,
    E=256, k=6, T=65536): bfloat16 8 / 16 / 32 lanes 31.1 / 30.2 / 34.0 us, float32 56.7 / 47.4 /
    44.5."""
    return 16 if dtype != "float32" and k <= 16 else 32


def aux_scores_name(dtype: str, vpl: int) -> str:
    return f"router_aux_scores_naive<{C_TYPES[dtype]}, {vpl}>"


_F = kernels.KernelFamily
DENSE = kernels.register_family(_F("router_te/dense.cu", tuple(
    dense_name(d, v) for d in C_TYPES for v in NAIVE_VPL)))
BACKWARD = kernels.register_family(_F("router_te/backward.cu", tuple(
    backward_name(d, v) for d in C_TYPES for v in (1, 4))
    + tuple(backward_idx_name(d, sg) for d in C_TYPES for sg in BACKWARD_IDX_SEG)))
AUX = kernels.register_family(_F("router_te/aux.cu", tuple(aux_scores_name(d, v) for d in C_TYPES for v in AUX_VPL)))
FAMILIES = (DENSE, BACKWARD, AUX)
