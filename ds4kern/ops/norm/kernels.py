"""rms_norm / rope_rotate kernel source (``cuda_src/norm/norm.cu``) and its instantiations."""

from __future__ import annotations

from ...core import kernels
from ...core.kernels import C_TYPES

THREADS = 256          # DS4_NORM_THREADS
ROPE_ROWS = THREADS // 32  # rope_rotate: rows per block (a warp per row, a lane per pair)
OUT_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16"}
ROPE_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16"}


def rms_name(dtype: str, out_dtype: str, has_w: bool) -> str:
    return f"rms_norm_rows<{C_TYPES[dtype]}, {OUT_TYPES[out_dtype]}, {'true' if has_w else 'false'}>"


def rope_name(dtype: str) -> str:
    return f"rope_rotate_rows<{ROPE_TYPES[dtype]}>"


NORM = kernels.register_family(kernels.KernelFamily("norm/norm.cu", tuple(
    rms_name(d, o, w) for d in C_TYPES for o in OUT_TYPES for w in (False, True))
    + tuple(rope_name(d) for d in ROPE_TYPES)))
FAMILIES = (NORM,)
