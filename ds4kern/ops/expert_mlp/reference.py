"""expert_mlp's reference backend (numpy, float32 arithmetic like the GPU) and the host checks of
``offsets``.

Per expert e and its rows ``x[offsets[e]:offsets[e + 1]]`` (bf16 values)::

    g = x @ w_gate[e].T;  u = x @ w_up[e].T                      float32 accumulation
    g = min(g, limit);    u = clip(u, -limit, limit)             (limit > 0; NaN propagates)
    h = bf16(silu(g) * u)                                        silu(g) = g / (1 + exp(-g))
    y = h @ w_down[e].T                                          float32, stored as out's dtype
"""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16

__all__ = ["reference_expert_mlp", "swiglu", "check_offsets", "reference_variant"]


def swiglu(g, u, limit: float):
    """DeepSeek-V4's clamped SwiGLU, elementwise in the inputs' float dtype (``limit`` 0: no clamp)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if limit:
            g = np.minimum(g, g.dtype.type(limit))
            u = np.clip(u, u.dtype.type(-limit), u.dtype.type(limit))
        return g / (g.dtype.type(1) + np.exp(-g)) * u


def check_offsets(offsets: np.ndarray, rows: int) -> None:
    """Host offsets: offsets[0] == 0, non-decreasing, offsets[E] <= rows (errors name the entry)."""
    o = np.asarray(offsets).astype(np.int64)
    if o[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(o[0])}")
    d = np.diff(o)
    if (d < 0).any():
        e = int(np.flatnonzero(d < 0)[0])
        raise ValueError(f"offsets must be non-decreasing; offsets[{e}] = {int(o[e])} > offsets[{e + 1}] = "
                         f"{int(o[e + 1])}")
    if o[-1] > rows:
        raise ValueError(f"offsets[E] = {int(o[-1])} is beyond the {rows} rows of x")


def reference_expert_mlp(x, offsets, w_gate, w_up, w_down, limit: float = 10.0, out_dtype=BFLOAT16, out=None):
    """``out`` (``[N, D]`` of ``out_dtype``): rows below offsets[E] filled; rows beyond it are left
    as they are (zeros when ``out`` is None)."""
    x = np.asarray(x)
    N, D = x.shape
    o = np.asarray(offsets).astype(np.int64)
    if out is None:
        out = np.zeros((N, D), out_dtype)
    for e in range(len(o) - 1):
        lo, hi = int(o[e]), int(o[e + 1])
        if hi <= lo:
            continue
        xe = x[lo:hi].astype(np.float32)
        g = xe @ np.asarray(w_gate[e]).astype(np.float32).T
        u = xe @ np.asarray(w_up[e]).astype(np.float32).T
        h = swiglu(g, u, limit).astype(BFLOAT16).astype(np.float32)
        out[lo:hi] = (h @ np.asarray(w_down[e]).astype(np.float32).T).astype(out.dtype)
    return out


def reference_variant(a) -> None:
    """The ``reference`` variant: fills ``a.out`` (rows below offsets[E])."""
    reference_expert_mlp(a.x, a.offsets, a.w_gate, a.w_up, a.w_down, a.limit, out=a.out)
