"""router_hash's kernel source (``cuda_src/router_hash/naive.cu``)."""

from ...core import kernels
from ...core.kernels import C_TYPES

WARPS_PER_BLOCK = 4  # one warp per token


def naive_name(dtype: str) -> str:
    return f"router_hash_naive<{C_TYPES[dtype]}>"


NAIVE = kernels.register_family(kernels.KernelFamily("router_hash/naive.cu", tuple(naive_name(d) for d in C_TYPES)))
FAMILIES = (NAIVE,)
