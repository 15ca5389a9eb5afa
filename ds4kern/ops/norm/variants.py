"""rms_norm / rope_rotate variants and their registration."""

from __future__ import annotations

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import NULL, grid, ptr
from ...core.registry import Variant
from . import kernels as K
from .api import RMS_OP, ROPE_OP, RmsArgs, RopeArgs
from .reference import reference_rms_norm, reference_rope_rotate


def _rms_reference(a: RmsArgs) -> None:
    a.out[...] = reference_rms_norm(a.x, a.weight, a.eps, a.out.dtype)


def _rms_naive(a: RmsArgs) -> None:
    N, D = (int(v) for v in a.x.shape)
    p = a.problem
    kern = K.NORM.kernel(K.rms_name(p.dtype, p.out_dtype, a.weight is not None))
    kern((grid(N, RMS_OP, "rows", "N"),), (K.THREADS,),
         (a.x, np.int64(a.stride), np.int32(D), ptr(a.weight), np.float32(a.eps), a.out))


def _rope_reference(a: RopeArgs) -> None:
    reference_rope_rotate(a.x, a.cos, a.sin, a.positions, a.start, a.inverse)


def _rope_naive(a: RopeArgs) -> None:
    x = a.x
    N, d = int(x.shape[0]), int(x.shape[-1])
    H = int(x.shape[1]) if x.ndim == 3 else 1
    rows = N * H
    kern = K.NORM.kernel(K.rope_name(a.problem.dtype))
    kern((grid(-(-rows // K.ROPE_ROWS), ROPE_OP, "rows", "N x H"),), (K.THREADS,),
         (x, np.int64(rows), np.int32(H), np.int32(d), np.int32(a.start), a.positions, a.cos, a.sin,
          np.int64(a.cos.shape[0]), np.int32(a.inverse), ptr(a.errors) if a.errors is not None else NULL))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(RMS_OP, "reference", "numpy", _rms_reference, description="numpy, float32 arithmetic"))
    register(Variant(RMS_OP, "naive", "cuda", _rms_naive,
                     description="a block of 256 threads per row: sum of squares, block reduction, scaled store"))
    register(Variant(ROPE_OP, "reference", "numpy", _rope_reference, description="numpy, float32 arithmetic, in place"))
    register(Variant(ROPE_OP, "naive", "cuda", _rope_naive,
                     description="a warp per row, a lane per pair, in place; bad positions skipped and counted"))
