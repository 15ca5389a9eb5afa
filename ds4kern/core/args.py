"""Scalar arguments checked at the public boundary, the same way by every op and tool.

numpy scalars count as what they hold (``np.int64(6)`` is an int, ``np.float32(0.01)`` a
number); a bool (Python's or numpy's) is never a number.  Errors name the argument: TypeError
for the wrong kind of value, ValueError for a value out of range.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["is_int", "is_number", "int_arg", "number_arg", "int_list", "bool_arg", "pow2_bucket"]


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _bounds(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in [{lo}, {hi}]"


def int_arg(name: str, v, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``v`` as a Python int, or an error naming ``name``."""
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an int {_bounds(lo, hi)}, got {v}")
    return v


def number_arg(name: str, v, *, positive: bool = False) -> float:
    """``v`` as a finite Python float (> 0 with ``positive``), or an error naming ``name``."""
    if not is_number(v):
        raise TypeError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or (positive and f <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {v!r}")
    return f


def bool_arg(name: str, v) -> bool:
    """``v`` (a Python or numpy bool) as a Python bool, or a TypeError naming ``name``."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return bool(v)


def int_list(name: str, values, *, lo: Optional[int] = None, hi: Optional[int] = None) -> list[int]:
    """A sequence of ints (each checked as by :func:`int_arg`) as a list, or an error naming ``name``."""
    if isinstance(values, (str, bytes)) or is_int(values) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    return [int_arg(f"{name} entry", v, lo=lo, hi=hi) for v in values]


def pow2_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 and 1 give 1): the size buckets problems share
    dispatch decisions and autotune entries in."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
