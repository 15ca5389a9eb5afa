"""``pack_kv_fp8`` / ``unpack_kv_fp8``: the FP8 KV row layout of ``sparse_attention(kv_format="fp8")``.

numpy arrays run the reference codec (``reference.py``), GPU arrays one warp per row
(``cuda_src/sparse_attention/fp8.cu``); both give the same bytes and values.
"""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16, Frame, dtype_name
from . import kernels as K
from .reference import DIM, FP8_ROW, reference_pack_kv_fp8, reference_unpack_kv_fp8

ROWS_PER_BLOCK = K.FP8_THREADS // 32


def _output(frame, out, shape, dtype, name="out"):
    if out is None:
        return frame.empty(shape, dtype)
    o = frame.convert(out, name, written=True)
    if o.dtype != dtype or tuple(o.shape) != shape:
        raise ValueError(f"{name} must be {dtype_name(dtype)} {shape}, got {dtype_name(o.dtype)} {tuple(o.shape)}")
    if not o.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {o.strides})")
    if frame.backend == "cuda" and o.size and o.data.ptr % 16:
        raise ValueError(f"{name}: the GPU kernel needs its data 16-byte aligned, got address {o.data.ptr:#x}")
    return o


def pack_kv_fp8(kv, *, out=None):
    """Pack bf16 KV rows ``[P, 512]`` into FP8 rows, uint8 ``[P, 584]``.

    Row layout: bytes 0-447 the 448 nope values (dims 0-447) in e4m3 (fn: max 448, no inf),
    448-575 the 64 rope values (dims 448-511) as bf16, unchanged; 576-582 seven ue8m0 scales
    (byte b = 2^(b - 127)), one per 64 nope values; 583 zero.  Per 64-value tile: scale = the power
    of two at or above amax / 448 (amax over the tile's finite values; clamped to [2^-126, 2^127],
    so an all-zero tile has scale 2^-126), value = x / scale rounded to the nearest e4m3, ties to
    even; NaN and inf become e4m3 NaN (0x7f).  Round trip error: at most half an e4m3 step, i.e.
    2^-4 of |x| for |x| >= 2^-6 * scale, 2^-10 * scale below.

    numpy in, numpy out (the reference); CuPy / torch CUDA in, the same kind out (one kernel).
    """
    frame = Frame(kv, "kv")
    x = frame.array
    if x.dtype != BFLOAT16 or x.ndim != 2 or x.shape[1] != DIM:
        raise ValueError(f"kv must be bfloat16 [P, 512], got {dtype_name(x.dtype)} {tuple(x.shape)}")
    P = int(x.shape[0])
    o = _output(frame, out, (P, FP8_ROW), np.dtype(np.uint8))
    if frame.backend == "numpy":
        o[...] = reference_pack_kv_fp8(x)
        return frame.give_back(o)
    if P:
        with frame.running():
            xc = frame.xp.ascontiguousarray(x)
            if xc.data.ptr % 16:
                raise ValueError(f"kv: the GPU kernel needs its data 16-byte aligned, got address {xc.data.ptr:#x}")
            K.FP8.kernel(K.PACK_NAME)(((P + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (K.FP8_THREADS,),
                                      (xc, np.int64(P), o))
    return frame.give_back(o)


def unpack_kv_fp8(packed, *, out=None):
    """FP8 rows uint8 ``[P, 584]`` (rows may be strided, 8-byte multiples) back to bf16 ``[P, 512]``:
    nope values e4m3 * scale rounded to bf16 (exact unless below bf16's range), rope values as
    stored.  The inverse of :func:`pack_kv_fp8` up to its rounding; numpy in runs the reference."""
    frame = Frame(packed, "packed")
    b = frame.array
    if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] != FP8_ROW:
        raise ValueError(f"packed must be uint8 [P, 584], got {dtype_name(b.dtype)} {tuple(b.shape)}")
    if b.shape[1] > 1 and b.strides[1] != 1:
        raise ValueError(f"packed: each row must be contiguous (strides {b.strides})")
    P = int(b.shape[0])
    o = _output(frame, out, (P, DIM), BFLOAT16)
    if frame.backend == "numpy":
        o[...] = reference_unpack_kv_fp8(b, dtype=BFLOAT16)
        return frame.give_back(o)
    if P:
        stride = int(b.strides[0]) if P > 1 else FP8_ROW
        if b.data.ptr % 8 or stride % 8 or stride < FP8_ROW:
            raise ValueError(f"packed: the GPU kernel needs 8-byte aligned rows at least 584 bytes apart, got "
                             f"address {b.data.ptr:#x}, row stride {stride}")
        with frame.running():
            K.FP8.kernel(K.UNPACK_NAME)(((P + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (K.FP8_THREADS,),
                                        (b, np.int64(stride), np.int64(P), o))
    return frame.give_back(o)
