"""The grouped tensor-core kernels, emulated in numpy lane by lane (``em_emulation``), against the
float64 oracle: checks their fragment layouts, the swizzled stages, the gate / up interleave,
the item search and the epilogue on a machine without a GPU.  The GPU tests run the real kernels
on the same kinds of cases."""

import numpy as np
import pytest
from em_cases import POISON_BF16, make_case, oracle, random_counts, rel_err
from em_emulation import find_item, grouped, mma

from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.expert_mlp import kernels as K


def poisoned(N, D, out_dtype):
    if out_dtype == "float32":
        return np.full((N, D), np.nan, np.float32)
    return np.full((N, D), POISON_BF16, np.uint16).view(BFLOAT16)


def is_poison(a):
    if a.dtype == np.float32:
        return np.isnan(a)
    return a.view(np.uint16) == POISON_BF16


@pytest.mark.parametrize("tn", K.TOKEN_GROUPS)
@pytest.mark.parametrize("limit,out_dtype", [(10.0, "bfloat16"), (None, "float32"), (0.5, "bfloat16")])
def test_emulated_grouped_matches_float64(rng, tn, limit, out_dtype):
    counts = [0, 1, 7, 9, 33, 100][:5] if tn < 64 else [0, 1, 9, 100, 0]
    E = len(counts)
    D, I = 128, 192
    c = make_case(rng, E, D, I, counts, tail=5, gain=6.0)
    N = c["x"].shape[0]
    m = int(c["offsets"][-1])
    out = grouped(c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], limit or 0.0, poisoned(N, D, out_dtype),
                  tn)
    want = oracle(np, c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], limit)
    assert not is_poison(out[:m]).any(), "a row of an expert was not written"
    assert is_poison(out[m:]).all(), "a row beyond offsets[E] was written"
    err = rel_err(out[:m], want)
    assert err < (5e-3 if out_dtype == "bfloat16" else 1e-3), err


def test_emulated_many_experts_and_rows(rng):
    """More experts than the item search's threads (two per thread), random counts."""
    E, D, I = 200, 64, 64
    counts = random_counts(rng, E, 150, empty_fraction=0.5)
    c = make_case(rng, E, D, I, counts)
    out = grouped(c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], 10.0, poisoned(150, D, "float32"), 8)
    want = oracle(np, c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], 10.0)
    assert rel_err(out, want) < 1e-3


def test_item_order_and_bounds():
    """Items run expert by expert, then tile, then row group; every row of every expert is in
    exactly one group of each tile; bad offsets stay within [0, N)."""
    offsets = np.array([0, 0, 3, 20, 20, 21], np.int32)
    E, N, tiles, tn = 5, 24, 2, 8
    seen = []
    w = 0
    while True:
        item, total = find_item(offsets, E, N, tiles, tn, w)
        if item is None:
            break
        seen.append(item)
        w += 1
    assert total == len(seen) == tiles * (1 + 3 + 1)
    assert seen[:3] == [(1, 0, 0, 3), (1, 1, 0, 3), (2, 0, 3, 8)]
    for tile in range(tiles):
        rows = sorted(r for e, t, r0, n in seen if t == tile for r in range(r0, r0 + n))
        assert rows == list(range(21))
    # decreasing and out-of-range offsets (on the GPU they are not checked): rows stay in [0, N)
    bad = np.array([5, -3, 40, 2, 30, 10], np.int32)
    w = 0
    while True:
        item, _ = find_item(bad, E, N, tiles, tn, w)
        if item is None:
            break
        e, t, r0, n = item
        assert 0 <= r0 and r0 + n <= N and n >= 1
        w += 1


def test_mma_layout_emulation_is_a_matrix_product(rng):
    """The emulated mma (PTX fragment layout) computes A @ B when the lanes hold the documented
    fragments: the oracle the kernel's emulation is checked against checks out itself."""
    A = rng.standard_normal((16, 16)).astype(BFLOAT16)
    B = rng.standard_normal((16, 8)).astype(BFLOAT16)
    a_bits, b_bits = A.view(np.uint16).astype(np.uint64), B.view(np.uint16).astype(np.uint64)
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3

    def pair(m, r, c0):
        return m[r, c0] | (m[r, c0 + 1] << 16)

    a = [pair(a_bits, g, 2 * t), pair(a_bits, g + 8, 2 * t), pair(a_bits, g, 2 * t + 8), pair(a_bits, g + 8, 2 * t + 8)]
    bt = b_bits.T  # [n, k]
    b = [pair(bt, g, 2 * t), pair(bt, g, 2 * t + 8)]
    d = mma([np.zeros(32)] * 4, a, b)
    want = A.astype(np.float64) @ B.astype(np.float64)
    np.testing.assert_allclose(d[0], want[g, 2 * t])
    np.testing.assert_allclose(d[3], want[g + 8, 2 * t + 1])
