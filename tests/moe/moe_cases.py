"""Inputs and independent formulations shared by the MoE permute / unpermute tests."""

import numpy as np

from ds4kern.core.arrays import BFLOAT16

DTYPES = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}


def make_indices(rng, T, k, E, skip=0.0, kind="random"):
    """int32 ``[T, k]`` expert ids: distinct per token when k <= E ("random"), all one expert
    ("one"), or a few hot experts ("hot"); a fraction ``skip`` of entries set to -1."""
    if kind == "one":
        idx = np.full((T, k), E - 1, np.int64)
    elif kind == "hot":
        idx = rng.integers(0, min(E, 3), (T, k))
    elif k <= E:
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :k] if T else np.zeros((0, k), np.int64)
    else:
        idx = rng.integers(0, E, (T, k))
    idx = idx.astype(np.int32)
    if skip:
        idx[rng.random((T, k)) < skip] = -1
    return idx


def make_rows(rng, T, D, dtype):
    return rng.standard_normal((T, D)).astype(DTYPES[dtype])


def independent_permutation(indices, E):
    """Pure Python: sort the valid (expert, flat index) pairs; ``(counts, offsets, order, slot)``."""
    T, k = indices.shape
    pairs = sorted((int(indices[t, j]), t * k + j) for t in range(T) for j in range(k) if indices[t, j] >= 0)
    counts = [0] * E
    for e, _ in pairs:
        counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    order = [f for _, f in pairs] + [-1] * (T * k - len(pairs))
    slot = np.full((T, k), -1, np.int32)
    for p, (_, f) in enumerate(pairs):
        slot[f // k, f % k] = p
    return (np.array(counts, np.int32), np.array(offsets, np.int32), np.array(order, np.int32), slot)


def fixed_order_float32(y_perm, slot, weights):
    """Pure Python over float32 scalars, j = 0 .. k-1, each product and sum rounded: float32 ``[T, D]``."""
    T, k = slot.shape
    D = y_perm.shape[1]
    y = np.asarray(y_perm, np.float32)
    out = np.zeros((T, D), np.float32)
    for t in range(T):
        for d in range(D):
            acc = np.float32(0.0)
            for j in range(k):
                s = int(slot[t, j])
                if s >= 0:
                    acc = np.float32(acc + np.float32(np.float32(weights[t, j]) * y[s, d]))
            out[t, d] = acc
    return out


def float64_sum(y_perm, slot, weights):
    """float64 ``[T, D]``: the exact weighted sums (an order-free oracle with a tolerance)."""
    T, k = slot.shape
    y = np.asarray(y_perm, np.float64)
    out = np.zeros((T, y.shape[1]), np.float64)
    for j in range(k):
        m = slot[:, j] >= 0
        out[m] += np.asarray(weights, np.float64)[m, j, None] * y[slot[m, j]]
    return out
