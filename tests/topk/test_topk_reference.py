"""topk_rows on the reference backend: the ordering rules against an independent formulation,
lengths, padding, dtypes, and every bad input."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.topk import order_keys, reference_topk_rows


def independent(scores, k, lengths=None):
    """Python sort on (rank of value, column): NaN below everything, -0 == +0."""
    s = np.asarray(scores, np.float64)
    R, C = s.shape
    out = np.full((R, k), -1, np.int32)
    for r in range(R):
        n = C if lengths is None else int(lengths[r])
        items = sorted(range(n), key=lambda c: ((0, 0.0) if np.isnan(s[r, c]) else (1, s[r, c] + 0.0), -c),
                       reverse=True)
        out[r, :min(k, n)] = items[:k]
    return out


@pytest.mark.parametrize("R,C,k", [(1, 1, 1), (3, 7, 5), (4, 512, 64), (2, 300, 512), (5, 2049, 17), (0, 4, 2)])
def test_matches_independent_sort(rng, R, C, k):
    s = rng.standard_normal((R, C)).astype(np.float32)
    np.testing.assert_array_equal(ds4kern.topk_rows(s, k), independent(s, k))


def test_ties_nan_signed_zero_and_infinities():
    s = np.array([[1.0, np.nan, 1.0, -0.0, 0.0, -np.inf, np.inf, np.nan, -1.0]], np.float32)
    got = ds4kern.topk_rows(s, 9)
    # +inf, the two 1.0 (lower column first), the zeros (tie: lower column), -1, -inf, then NaNs
    np.testing.assert_array_equal(got[0], [6, 0, 2, 3, 4, 8, 5, 1, 7])
    np.testing.assert_array_equal(got, independent(s, 9))


def test_order_keys_are_monotone():
    v = np.array([np.nan, -np.inf, -3.0, -1e-45, -0.0, 0.0, 1e-45, 2.0, np.inf], np.float32)
    keys = order_keys(v[None])[0]
    assert keys[0] == 1 and (np.diff(keys[1:].astype(np.int64)) >= 0).all() and keys[4] == keys[5]
    assert (keys > 0).all()


def test_lengths_and_padding(rng):
    s = rng.standard_normal((4, 50)).astype(np.float32)
    lens = np.array([50, 0, 3, 20], np.int32)
    got = ds4kern.topk_rows(s, 10, lengths=lens)
    np.testing.assert_array_equal(got, independent(s, 10, lens))
    assert (got[1] == -1).all() and (got[2, 3:] == -1).all() and (got[2, :3] >= 0).all()
    np.testing.assert_array_equal(ds4kern.topk_rows(s, 10, lengths=lens.astype(np.int64)), got)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrow_dtypes(rng, dtype):
    dt = BFLOAT16 if dtype == "bfloat16" else np.float16
    s = rng.standard_normal((3, 400)).astype(dt)  # many exact ties after rounding
    np.testing.assert_array_equal(ds4kern.topk_rows(s, 100), independent(s.astype(np.float32), 100))


def test_strided_rows_and_out(rng):
    wide = rng.standard_normal((6, 90)).astype(np.float32)
    view = wide[:, 5:70]
    out = np.full((6, 8), 7, np.int32)
    assert ds4kern.topk_rows(view, 8, out=out) is out
    np.testing.assert_array_equal(out, independent(view, 8))


def test_k_beyond_columns_and_numpy_ints(rng):
    s = rng.standard_normal((2, 3)).astype(np.float32)
    got = ds4kern.topk_rows(s, np.int64(5))
    assert got.shape == (2, 5) and (got[:, 3:] == -1).all()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=2049), ValueError, "k must be in"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(scores=np.zeros((3, 4), np.int32)), TypeError, "scores must be float32"),
    (dict(scores=np.zeros(4, np.float32)), ValueError, "scores must be a 2-D"),
    (dict(scores=np.zeros((4, 6), np.float32)[:, ::2]), ValueError, "each row must be contiguous"),
    (dict(lengths=np.array([1, 2], np.int32)), ValueError, r"lengths must have shape \[R\]"),
    (dict(lengths=np.array([1, 2, 3], np.float32)), TypeError, "lengths must be int32 or int64"),
    (dict(lengths=np.array([1, 5, 3], np.int32)), ValueError, r"lengths\[1\] = 5"),
    (dict(lengths=np.array([1, -1, 3], np.int32)), ValueError, r"lengths\[1\] = -1"),
    (dict(out=np.zeros((3, 3), np.int32)), ValueError, r"out must have shape \[R, k\]"),
    (dict(out=np.zeros((3, 2), np.int64)), TypeError, "out must be int32"),
    (dict(errors=np.zeros(1, np.int32)), TypeError, "errors= is a device counter"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(scores=np.ones((3, 4), np.float32), k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ds4kern.topk_rows(args.pop("scores"), args.pop("k"), **args)


def test_read_only_out_is_refused():
    out = np.zeros((3, 2), np.int32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        ds4kern.topk_rows(np.ones((3, 4), np.float32), 2, out=out)


def test_reference_function_matches_op(rng):
    s = rng.standard_normal((3, 33)).astype(np.float32)
    np.testing.assert_array_equal(reference_topk_rows(s, 4), ds4kern.topk_rows(s, 4))


def test_radix_plan_levels():
    from ds4kern.ops.topk import radix_plan, scratch_bytes
    from ds4kern.ops.topk.kernels import chunk_of

    assert radix_plan(8192, 512, 16) == [1]
    assert radix_plan(8192, 512, 8) == [2, 1]
    assert radix_plan(262144, 512, 32) == [16, 1]
    assert radix_plan(262144, 2048, 32) == [16, 2, 1]
    assert radix_plan(0, 4, 8) == [1]
    for C, k, per in [(262144, 2048, 8), (1 << 20, 1024, 32), (5, 2048, 8)]:
        levels = radix_plan(C, k, per)
        assert levels[-1] == 1 and all(a > b for a, b in zip(levels, levels[1:]))
        assert all(-(-(a * k) // chunk_of(32)) == b for a, b in zip(levels[1:], levels[2:]))
    assert scratch_bytes(8, 8192, 512, 16) == 0 and scratch_bytes(8, 262144, 512, 32) == 8 * 16 * 512 * 8


def test_radix_default_chunk():
    """One chunk per row where it fits; longer rows: the fewest levels, then the smallest chunk
    (the measured winners on an H100, variants._radix_configs)."""
    from ds4kern.ops.topk.api import TopkProblem
    from ds4kern.ops.topk.variants import _radix_configs

    def first(R, C, k):
        return _radix_configs(TopkProblem("cuda", R, C, k, "float32", False, 227 << 10))[0]["per_thread"]

    assert first(4, 8192, 512) == 16      # one chunk of 8192 per row
    assert first(8, 262144, 512) == 16    # 16 and 32 take two levels, 8 three
    assert first(8, 262144, 1024) == 32   # only 32 takes two levels (16: 32 x 1024 candidates to merge)
    assert first(1, 65536, 1024) == 8     # all two levels: the most blocks
    assert first(64, 65536, 1024) == 8
    # k = 2048: chunks of 4096 (< 4 k) run as 16384, so 8 would only relabel 32's launch; all three
    # levels deep, the smallest chunk launched is 16's 8192
    assert first(8, 262144, 2048) == 16
    assert first(1, 1 << 20, 2048) != 8


def test_explain_on_host():
    d = ds4kern.explain("topk_rows", np.ones((2, 9), np.float32), 3)
    assert d.chosen.name == "reference"


def test_host_keeps_int64_lengths_exact(rng):
    """int64 lengths reach the kernels clipped, not wrapped (2**32 + 5 must not become 5)."""
    from ds4kern.core.arrays import Frame
    from ds4kern.ops.topk.api import check_lengths_arg

    n = np.array([2 ** 32 + 5, -2 ** 33, 7], np.int64)

    class GpuLike(Frame):
        def __init__(self):
            self.backend = "cuda"

        def convert(self, x, name):
            return x

        @property
        def xp(self):
            return np

    got = check_lengths_arg(GpuLike(), n, 3, 100)
    assert got.dtype == np.int32 and list(got) == [101, -1, 7]


def test_hist_plan():
    """The hist variant's slices and scratch formula (its #define mirrors: tests/core/test_mirrors.py)."""
    from ds4kern.ops.topk import kernels as K

    assert [K.hist_slices(c) for c in (0, 1, 4096, 4097, 262144)] == [1, 1, 1, 2, 64]
    assert K.hist_scratch_bytes(8, 262144, 512) == 8 * (8 + 2048) * 4 + 8 * 64 * 4 + 8 * 512 * 8
    d = ds4kern.explain("topk_rows", np.ones((2, 9), np.float32), 3)
    assert "hist" in [c.variant.name for c in d.candidates]
