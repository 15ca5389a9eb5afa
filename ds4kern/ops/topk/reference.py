"""topk_rows' reference backend (numpy) and the ordering every variant follows.

Order: descending score; NaN ranks below -inf (picked only when no number is left, as in the
routers; torch.topk puts NaN first); -0.0 equals +0.0; equal scores (all NaNs are equal) go to
the lower column.  Only the first ``lengths[r]`` columns of row r
take part; a row with fewer than k of them is padded with -1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_topk_rows", "order_keys", "check_lengths", "reference_variant"]


def order_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the score order above (``ds4_order_key`` of the
    kernels): NaN -> 1, -0.0 -> +0.0, then sign-flip for positives, bit-not for negatives (-inf ->
    0x007fffff).  Never 0 (the kernels' "no element")."""
    f = np.ascontiguousarray(scores, dtype=np.float32)
    u = f.view(np.uint32).copy()
    u[u == 0x80000000] = 0
    neg = (u & 0x80000000) != 0
    u = np.where(neg, ~u, u | np.uint32(0x80000000)).astype(np.uint32)
    u[np.isnan(f)] = 1
    return u


def check_lengths(lengths: np.ndarray, cols: int) -> None:
    bad = (lengths < 0) | (lengths > cols)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"lengths must lie in [0, C={cols}]; lengths[{r}] = {int(lengths[r])}")


def reference_topk_rows(scores: np.ndarray, k: int, lengths=None) -> np.ndarray:
    """int32 ``[R, k]``: per row, the columns of the k largest of the first ``lengths[r]`` scores,
    in the order above, padded with -1."""
    s = np.asarray(scores)
    R, C = s.shape
    out = np.full((R, k), -1, np.int32)
    if R == 0 or C == 0:
        return out
    keys = order_keys(s.astype(np.float32))
    lens = np.full(R, C, np.int64) if lengths is None else np.asarray(lengths).astype(np.int64)
    check_lengths(lens, C)
    cols = np.arange(C)
    for r in range(R):
        n = int(lens[r])
        if n == 0:
            continue
        order = np.lexsort((cols[:n], ~keys[r, :n]))  # key descending, then column ascending
        m = min(k, n)
        out[r, :m] = order[:m]
    return out


def reference_variant(a) -> None:
    """The ``reference`` variant: fills ``a.out``."""
    lens = None if a.lengths is None else a.lengths
    a.out[...] = reference_topk_rows(a.scores, a.k, lens)
