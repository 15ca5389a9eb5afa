"""``rms_norm`` and ``rope_rotate``: the row operations of a DeepSeek-V4 block as one launch each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import number_arg, pow2_bucket
from ...core.arrays import BFLOAT16, FLOAT_DTYPES, Frame, dtype_name, rows_view
from ...core.op import Call, define_op, reference_or
from ..expert_mlp.api import _out_dtype as out_dtype_arg  # float32 / bfloat16 by name or dtype
from . import kernels

RMS_OP = "rms_norm"
ROPE_OP = "rope_rotate"


@dataclass(frozen=True)
class NormProblem:
    backend: str
    rows_bucket: int
    width: int
    dtype: str
    out_dtype: str
    weighted: bool = False

    def __str__(self) -> str:
        return (f"backend={self.backend} rows<={self.rows_bucket} width={self.width} {self.dtype} -> "
                f"{self.out_dtype}{' weighted' if self.weighted else ''}")

    @property
    def bucket(self) -> tuple:
        return (self.rows_bucket, self.width, self.dtype, self.out_dtype, self.weighted)


@dataclass
class RmsArgs:
    """``x`` ``[N, D]`` rows (last axis contiguous, rows ``stride`` elements apart), ``weight``
    float32 ``[D]`` contiguous or None, ``out`` ``[N, D]`` contiguous."""

    x: Any
    stride: int
    weight: Any
    eps: float
    out: Any
    problem: NormProblem
    frame: Frame


@dataclass
class RopeArgs:
    """``x`` ``[N, H, d]`` contiguous (rotated in place), ``positions`` int64 ``[N]``, the tables
    float32 ``[max_pos, 32]`` contiguous, ``start`` the first rotated column, ``errors`` None or
    a device int32 counter."""

    x: Any
    positions: Any
    cos: Any
    sin: Any
    start: int
    inverse: bool
    errors: Any
    problem: NormProblem
    frame: Frame


@define_op(RMS_OP, rule=reference_or("naive"), kernels=kernels.FAMILIES)
def rms_norm(x, weight=None, *, eps: float = 1e-6, out_dtype="float32", out=None, plan_only: bool = False):
    """RMSNorm of the last axis: ``x * (1 / sqrt(mean(x^2) + eps)) * weight`` in float32.

    Args:
        x: ``[..., D]`` float32 / float16 / bfloat16, last axis contiguous; the leading axes must
            merge into one row axis without a copy.
        weight: float32 ``[D]`` or None (no weight).
        eps: a number >= 0.
        out_dtype: "float32" (default) or "bfloat16"; out: optional C-contiguous output of x's shape.

    One launch on the GPU (a block per row); the reference backend computes the same in numpy.
    Returns ``out``.
    """
    frame = Frame(x, "x")
    xa = frame.array
    if xa.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {dtype_name(xa.dtype)}")
    if xa.ndim < 1 or xa.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {list(xa.shape)}")
    D = int(xa.shape[-1])
    N = math.prod(int(d) for d in xa.shape[:-1])
    rows = rows_view(frame.xp, xa, tuple(xa.shape[:-1]), D, "x") if xa.ndim != 2 else xa
    if rows.ndim == 2 and rows.strides[-1] != rows.itemsize:
        rows = frame.xp.ascontiguousarray(rows)
    if rows.ndim == 1:
        rows = rows.reshape(1, D)
    w = None
    if weight is not None:
        w = frame.convert(weight, "weight")
        if w.dtype != np.float32 or w.shape != (D,):
            raise ValueError(f"weight must be float32 of shape [D] = [{D}], got {dtype_name(w.dtype)} {list(w.shape)}")
        w = frame.xp.ascontiguousarray(w)
    e = number_arg("eps", eps)
    if not e >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    odt = out_dtype_arg("float32" if out_dtype is None else out_dtype, None)
    if out is not None:
        o = frame.convert(out, "out", written=True)
        if o.dtype != odt or tuple(o.shape) != tuple(xa.shape) or not o.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype_name(odt)} array of shape {list(xa.shape)}")
    else:
        o = frame.empty(tuple(xa.shape), odt)
    problem = NormProblem(frame.backend, pow2_bucket(N), D, dtype_name(xa.dtype), dtype_name(odt), w is not None)
    if plan_only:
        return Call(problem)
    stride = int(rows.strides[0] // rows.itemsize) if rows.shape[0] > 1 else D
    return Call(problem, RmsArgs(rows, stride, w, e, o.reshape(N, D), problem, frame), frame, o, skip=N == 0)


@define_op(ROPE_OP, rule=reference_or("naive"), kernels=kernels.FAMILIES)
def rope_rotate(x, cos, sin, positions, *, start: Optional[int] = None, inverse: bool = False, errors=None,
                plan_only: bool = False):
    """Rotates, in place, the interleaved pairs (2i, 2i + 1) of the 64 values at columns
    ``start .. start + 63`` of x (default: the last 64) at each token's position:
    ``x0' = x0 c - x1 s``, ``x1' = x0 s + x1 c`` with ``(c, s) = (cos, sin)[positions[n], i]``
    (the inverse rotation with ``inverse=True``), float32 arithmetic.

    Args:
        x: float32 or bfloat16 ``[N, d]`` or ``[N, H, d]`` (token n's H rows share its position),
            C-contiguous, d >= 64.
        cos, sin: float32 ``[max_pos, 32]`` (:func:`ds4kern.rope_table`).
        positions: int ``[N]`` in [0, max_pos).  Host arrays are checked (ValueError); on the GPU a
            position outside is skipped (the row is left as it was) and counted in ``errors`` (an
            int32 device array of one element) when given.

    One launch on the GPU.  Returns x.
    """
    frame = Frame(x, "x")
    xa = frame.array
    if xa.dtype not in (np.dtype(np.float32), BFLOAT16):
        raise TypeError(f"x must be float32 or bfloat16, got {dtype_name(xa.dtype)}")
    if xa.ndim not in (2, 3) or xa.shape[-1] < 64 or not xa.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous [N, d] or [N, H, d] with d >= 64, got {list(xa.shape)}")
    N, d = int(xa.shape[0]), int(xa.shape[-1])
    H = int(xa.shape[1]) if xa.ndim == 3 else 1
    s0 = d - 64 if start is None else start
    if isinstance(s0, bool) or not isinstance(s0, (int, np.integer)) or not 0 <= s0 <= d - 64 or s0 % 2:
        raise ValueError(f"start must be an even int in [0, d - 64 = {d - 64}], got {start!r}")
    tabs = []
    for name, t in (("cos", cos), ("sin", sin)):
        a = frame.convert(t, name)
        if a.dtype != np.float32 or a.ndim != 2 or a.shape[1] != 32:
            raise ValueError(f"{name} must be float32 [max_pos, 32], got {dtype_name(a.dtype)} {list(a.shape)}")
        tabs.append(frame.xp.ascontiguousarray(a))
    if tabs[0].shape != tabs[1].shape:
        raise ValueError(f"cos and sin must have the same shape, got {list(tabs[0].shape)} and {list(tabs[1].shape)}")
    p = frame.convert(positions, "positions")
    if p.dtype.kind not in "iu" or p.shape != (N,):
        raise ValueError(f"positions must be integers of shape [N] = [{N}], got {dtype_name(p.dtype)} {list(p.shape)}")
    p = frame.xp.ascontiguousarray(p.astype(np.int64))
    if frame.backend == "numpy" and N and (p.min() < 0 or p.max() >= tabs[0].shape[0]):
        raise ValueError(f"positions must lie in [0, {tabs[0].shape[0]}) (the tables' rows), got "
                         f"[{int(p.min())}, {int(p.max())}]")
    if errors is not None and frame.backend == "numpy":
        raise TypeError("errors is a device counter: pass it with GPU arrays only")
    err = None if errors is None else frame.convert(errors, "errors", written=True)
    problem = NormProblem(frame.backend, pow2_bucket(N * H), d, dtype_name(xa.dtype), dtype_name(xa.dtype))
    if plan_only:
        return Call(problem)
    args = RopeArgs(xa, p, tabs[0], tabs[1], int(s0), bool(inverse), err, problem, frame)
    return Call(problem, args, frame, x, skip=N == 0, give_back=False)
