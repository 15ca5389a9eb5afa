"""``decode_slots``: the ``sparse_attention`` indices of a DeepSeek-V4 decode step (window rows of
the ring, then the indexer's compressed rows (CSA) or every visible one (HCA)) in one launch."""

from __future__ import annotations

import numpy as np

from ...core.args import int_arg
from ...core.arrays import Frame, dtype_name
from . import kernels as K


def reference_decode_slots(positions, window: int, ring_base: int, rows: int, ratio: int = 0, selected=None,
                           width: int = 0) -> np.ndarray:
    """numpy twin of the kernel (see :func:`decode_slots`)."""
    pos = np.asarray(positions).astype(np.int64)
    B = pos.shape[0]
    q = pos.reshape(B, 1) - (window - 1) + np.arange(window).reshape(1, window)
    win = np.where(q >= 0, ring_base + np.arange(B).reshape(B, 1) * window + q % window, -1)
    base = np.arange(B).reshape(B, 1) * rows
    if selected is not None:
        sel = np.asarray(selected)
        comp = np.where(sel >= 0, sel + base, -1)
    elif ratio and width:
        c = np.arange(width).reshape(1, width)
        comp = np.where(c < ((pos + 1) // ratio).reshape(B, 1), c + base, -1)
    else:
        comp = np.zeros((B, 0), np.int64)
    return np.concatenate([win, comp], axis=1).astype(np.int32)


def decode_slots(positions, *, window: int, ring_base: int, rows: int, ratio: int = 0, selected=None,
                 width: int = 0):
    """int32 ``[B, window + C]`` slot indices of one decode step into a pool whose sequence b keeps
    its compressed row c at slot ``b * rows + c`` and its window ring row ``p % window`` at slot
    ``ring_base + b * window + p % window``:

    - columns ``0 .. window - 1``: positions ``p - window + 1 .. p`` (oldest first), -1 before 0;
    - CSA (``selected`` int32 ``[B, k]``, the indexer's columns, -1 padded): ``selected + b * rows``;
    - HCA (``ratio`` > 0 and ``width`` columns): ``b * rows + c`` for the visible rows
      ``c < (p + 1) // ratio``, -1 beyond;
    - SWA: neither (C = 0).

    ``positions``: int ``[B]`` (>= 0).  numpy in, numpy out; GPU arrays: one kernel, no host
    synchronisation.
    """
    frame = Frame(positions, "positions")
    pos = frame.array
    if pos.ndim != 1 or pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers of shape [B], got {dtype_name(pos.dtype)} {list(pos.shape)}")
    W = int_arg("window", window, lo=1)
    base = int_arg("ring_base", ring_base, lo=0)
    R = int_arg("rows", rows, lo=0)
    ratio = int_arg("ratio", ratio, lo=0)
    width = int_arg("width", width, lo=0)
    B = int(pos.shape[0])
    sel = None
    if selected is not None:
        sel = frame.convert(selected, "selected")
        if sel.dtype != np.int32 or sel.ndim != 2 or sel.shape[0] != B:
            raise ValueError(f"selected must be int32 [B = {B}, k], got {dtype_name(sel.dtype)} {list(sel.shape)}")
    if base + B * W >= 2 ** 31 or B * max(R, 1) >= 2 ** 31:
        raise ValueError("slot numbers must fit int32 (the pool's rows)")
    if frame.backend == "numpy":
        return reference_decode_slots(pos, W, base, R, ratio, sel, width)
    xp = frame.xp
    C = int(sel.shape[1]) if sel is not None else (width if ratio else 0)
    out = frame.empty((B, W + C), np.int32)
    n = B * (W + C)
    if n:
        with frame.running():
            p64 = xp.ascontiguousarray(pos.astype(np.int64, copy=False))
            K.SLOTS.kernel(K.SLOTS_NAME)((-(-n // K.SLOTS_THREADS),), (K.SLOTS_THREADS,),
                                         (p64, np.int32(B), np.int32(W), np.int64(base), np.int64(R), np.int32(ratio),
                                          xp.ascontiguousarray(sel) if sel is not None else np.uint64(0),
                                          np.int32(C if sel is not None else 0), np.int32(C if sel is None else 0),
                                          out))
    return frame.give_back(out)
