"""moe_permute / moe_unpermute on the reference backend (numpy), the oracle of the GPU tests.

Permutation: a stable sort of the valid flat entries ``t * k + j`` by expert (ascending flat
index within an expert); -1 entries take no row.  Unpermute: float32 sums in the fixed order
j = 0 .. k-1, each product and each sum rounded to float32 (what the kernel does with
``__fmul_rn`` / ``__fadd_rn``), then one rounding to the output dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_permutation", "reference_permute_rows", "reference_unpermute", "check_indices",
           "check_slots", "reference_permute_variant", "reference_unpermute_variant"]


def check_indices(indices: np.ndarray, num_experts: int) -> None:
    """ValueError naming ``indices`` when an entry is neither -1 nor in [0, num_experts)."""
    flat = np.asarray(indices).reshape(-1)
    bad = (flat < -1) | (flat >= num_experts)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        k = indices.shape[1] if indices.ndim == 2 and indices.shape[1] else 1
        raise ValueError(f"indices must be -1 (no expert) or lie in [0, num_experts={num_experts}); "
                         f"indices[{i // k}, {i % k}] = {int(flat[i])}")


def check_slots(slot: np.ndarray, rows: int) -> None:
    """ValueError naming ``perm.slot`` / ``y_perm`` when a slot is neither -1 nor a row of y_perm."""
    flat = np.asarray(slot).reshape(-1)
    bad = (flat < -1) | (flat >= rows)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"perm.slot entries must be -1 or rows of y_perm (it has {rows}); entry {i} is "
                         f"{int(flat[i])}")


def reference_permutation(indices: np.ndarray, num_experts: int) -> tuple:
    """``(counts [E], offsets [E + 1], order [T*k], slot [T, k])``, int32, for int ``indices``
    ``[T, k]`` already checked by :func:`check_indices`."""
    T, k = indices.shape
    flat = np.asarray(indices).reshape(-1).astype(np.int64)
    valid = np.flatnonzero(flat >= 0)
    experts = flat[valid]
    counts = np.bincount(experts, minlength=num_experts).astype(np.int32)
    offsets = np.zeros(num_experts + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    ordered = valid[np.argsort(experts, kind="stable")]
    order = np.full(T * k, -1, np.int32)
    order[:ordered.size] = ordered
    slot = np.full(T * k, -1, np.int32)
    slot[ordered] = np.arange(ordered.size, dtype=np.int32)
    return counts, offsets, order, slot.reshape(T, k)


def reference_permute_rows(x: np.ndarray, order: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out[p] = x[order[p] // k]`` for the rows p with ``order[p] >= 0``; other rows untouched."""
    n = int(np.count_nonzero(order >= 0))
    if n:
        out[:n] = x[order[:n] // k]


def reference_unpermute(y_perm: np.ndarray, slot: np.ndarray, weights: np.ndarray, out_dtype) -> np.ndarray:
    """``[T, D]`` in ``out_dtype``: per token, the float32 fixed-order weighted sum of its rows."""
    T, k = slot.shape
    D = y_perm.shape[1]
    acc = np.zeros((T, D), np.float32)
    for j in range(k):
        s = slot[:, j]
        m = s >= 0
        if m.any():
            prod = weights[m, j].astype(np.float32)[:, None] * y_perm[s[m]].astype(np.float32)
            acc[m] = acc[m] + prod
    return acc.astype(out_dtype)


def reference_permute_variant(a) -> None:
    """The ``reference`` variant of moe_permute: fills ``a``'s outputs."""
    counts, offsets, order, slot = reference_permutation(a.indices, a.num_experts)
    a.counts[...] = counts
    a.offsets[...] = offsets
    a.order[...] = order
    a.slot[...] = slot
    if a.x is not None:
        reference_permute_rows(a.x, order, a.k, a.x_perm)


def reference_unpermute_variant(a) -> None:
    """The ``reference`` variant of moe_unpermute: fills ``a.out``."""
    a.out[...] = reference_unpermute(a.y_perm, a.slot, a.weights, a.out.dtype)
