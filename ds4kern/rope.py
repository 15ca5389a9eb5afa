"""RoPE tables (plain and YaRN) for the compressor and any other op that takes ``cos, sin``.

Interleaved convention: channel pairs ``(2i, 2i + 1)`` of the rotated dims turn by angle
``position * freq[i]``::

    y[2i]     = x[2i] * cos[pos, i] - x[2i + 1] * sin[pos, i]
    y[2i + 1] = x[2i] * sin[pos, i] + x[2i + 1] * cos[pos, i]

with ``freq[i] = theta ** (-2i / dim)``.  YaRN (as in the DeepSeek-V3/V4 inference code) keeps
the fast-turning frequencies, divides the slow ones by ``factor``, and blends linearly between:
with ``corr(n) = dim * ln(original_max_pos / (2 pi n)) / (2 ln theta)``,
``low = max(floor(corr(beta_fast)), 0)``, ``high = min(ceil(corr(beta_slow)), dim - 1)``,
``ramp[i] = clip((i - low) / (high - low), 0, 1)`` (``high - low`` raised to 0.001 if zero),
``freq[i] = freq[i] / factor * ramp[i] + freq[i] * (1 - ramp[i])``.  YaRN's attention-scale
correction (mscale) is not part of the table.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .core.arrays import require_cupy

__all__ = ["rope_frequencies", "rope_table"]


def _positive(name, v, integer=False):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if integer and int(v) != v:
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return int(v) if integer else float(v)


def rope_frequencies(dim: int = 64, theta: float = 10000.0, *, yarn_factor: Optional[float] = None,
                     original_max_pos: int = 4096, beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """float64 ``[dim // 2]`` angular frequencies (radians per position), plain or YaRN."""
    dim = _positive("dim", dim, integer=True)
    if dim % 2:
        raise ValueError(f"dim must be even (channel pairs), got {dim}")
    theta = _positive("theta", theta)
    freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn_factor is None:
        return freqs
    factor = _positive("yarn_factor", yarn_factor)
    orig = _positive("original_max_pos", original_max_pos, integer=True)
    bf, bs = _positive("beta_fast", beta_fast), _positive("beta_slow", beta_slow)

    def corr(n_rot):
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(bf)), 0)
    high = min(math.ceil(corr(bs)), dim - 1)
    span = (high - low) if high != low else 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / span, 0.0, 1.0)
    return freqs / factor * ramp + freqs * (1.0 - ramp)


def rope_table(max_pos: int, dim: int = 64, theta: float = 10000.0, *, yarn_factor: Optional[float] = None,
               original_max_pos: int = 4096, beta_fast: float = 32.0, beta_slow: float = 1.0,
               device: bool = False):
    """``(cos, sin)``: float32 ``[max_pos, dim // 2]`` tables for positions ``0 .. max_pos - 1``.

    Computed in float64 on the host, rounded once to float32.  ``yarn_factor=None`` gives plain
    RoPE; a number turns YaRN on (see the module docstring).  DeepSeek-V4's compressed layers use
    ``dim=64`` and ``theta=160000`` with YaRN; take the factor and original length from the model's
    config.  ``device=True`` returns CuPy arrays on the current device (needs CuPy and a GPU).
    """
    cp = require_cupy("rope_table(device=True)") if device else None
    max_pos = _positive("max_pos", max_pos, integer=True)
    freqs = rope_frequencies(dim, theta, yarn_factor=yarn_factor, original_max_pos=original_max_pos,
                             beta_fast=beta_fast, beta_slow=beta_slow)
    ang = np.outer(np.arange(max_pos, dtype=np.float64), freqs)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    if device:
        return cp.asarray(cos), cp.asarray(sin)
    return cos, sin
