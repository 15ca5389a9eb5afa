"""rms_norm / rope_rotate reference backend (numpy, float32 arithmetic like the GPU)."""

from __future__ import annotations

import numpy as np


def reference_rms_norm(x, weight, eps: float, out_dtype=np.float32) -> np.ndarray:
    """``x * (1 / sqrt(mean(x^2, last axis) + eps)) * weight`` in float32, as ``out_dtype``."""
    x = np.asarray(x).astype(np.float32)
    r = np.float32(1.0) / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps))
    y = x * r if weight is None else x * r * np.asarray(weight, np.float32)
    return y.astype(out_dtype)


def reference_rope_rotate(x, cos, sin, positions, start: int, inverse: bool = False) -> np.ndarray:
    """Rotates x[..., start:start + 64] (interleaved pairs) in place at ``positions`` (one per token,
    the first axis of x); float32 arithmetic.  Returns x."""
    pos = np.asarray(positions).astype(np.int64)
    c = np.asarray(cos, np.float32)[pos]
    s = np.asarray(sin, np.float32)[pos]
    if inverse:
        s = -s
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (32,)
    c, s = c.reshape(shape), s.reshape(shape)
    seg = x[..., start:start + 64]
    x0 = seg[..., 0::2].astype(np.float32)
    x1 = seg[..., 1::2].astype(np.float32)
    seg[..., 0::2] = (x0 * c - x1 * s).astype(x.dtype)
    seg[..., 1::2] = (x0 * s + x1 * c).astype(x.dtype)
    return x
