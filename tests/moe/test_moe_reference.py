"""moe_permute / moe_unpermute on the reference backend: against independent pure-Python
formulations on fresh random inputs (odd sizes, empty, k = 1, one expert, -1 entries, E not a
power of two, strided x, every dtype), and every bad input named."""

import numpy as np
import pytest
from moe_cases import (DTYPES, fixed_order_float32, float64_sum, independent_permutation, make_indices,
                       make_rows)

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.kernels import source_define
from ds4kern.ops.moe import (MoePermutation, moe_permute, moe_unpermute, reference_permutation,
                             reference_unpermute)
from ds4kern.ops.moe import kernels as K

CASES = [(0, 3, 8), (1, 1, 1), (5, 1, 3), (7, 2, 7), (33, 6, 256), (100, 8, 384), (61, 6, 1000), (17, 9, 4),
         (300, 6, 1024)]


def check_perm(perm, indices, E):
    counts, offsets, order, slot = independent_permutation(indices, E)
    np.testing.assert_array_equal(perm.counts, counts)
    np.testing.assert_array_equal(perm.offsets, offsets)
    np.testing.assert_array_equal(perm.order, order)
    np.testing.assert_array_equal(perm.slot, slot)
    for a in (perm.counts, perm.offsets, perm.order, perm.slot):
        assert a.dtype == np.int32
    T, k = indices.shape
    assert (perm.num_tokens, perm.k, perm.num_experts, perm.num_entries) == (T, k, E, T * k)


@pytest.mark.parametrize("skip", [0.0, 0.3])
@pytest.mark.parametrize("T,k,E", CASES, ids=[f"T{t}-k{k}-E{e}" for t, k, e in CASES])
def test_permutation_matches_independent(rng, T, k, E, skip):
    idx = make_indices(rng, T, k, E, skip)
    perm = moe_permute(idx, E)
    check_perm(perm, idx, E)
    assert perm.x_perm is None


@pytest.mark.parametrize("kind", ["one", "hot"])
def test_one_and_hot_experts(rng, kind):
    idx = make_indices(rng, 257, 6, 64, 0.1, kind=kind)
    check_perm(moe_permute(idx, 64), idx, 64)


def test_all_skipped_and_empty():
    idx = np.full((4, 3), -1, np.int32)
    perm = moe_permute(idx, 5)
    assert (perm.counts == 0).all() and (perm.offsets == 0).all()
    assert (perm.order == -1).all() and (perm.slot == -1).all()
    x = np.ones((0, 8), np.float32)
    empty = moe_permute(np.zeros((0, 2), np.int32), 3, x)
    assert empty.order.shape == (0,) and empty.slot.shape == (0, 2) and empty.x_perm.shape == (0, 8)
    assert (empty.counts == 0).all() and (empty.offsets == 0).all()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
def test_rows_follow_the_order(rng, dtype, layout):
    T, k, E, D = 45, 4, 10, 24
    idx = make_indices(rng, T, k, E, 0.2)
    wide = make_rows(rng, 2 * T, D + 5, dtype)
    x = {"contiguous": np.ascontiguousarray(wide[:T, :D]), "strided": wide[::2, 3:3 + D],
         "offset": wide[1:T + 1, 1:1 + D]}[layout]
    poison = np.full((T * k, D), 7.0, np.float32).astype(DTYPES[dtype])
    out = MoePermutation(np.zeros(E, np.int32), np.zeros(E + 1, np.int32), np.zeros(T * k, np.int32),
                         np.zeros((T, k), np.int32), poison, T, k, E)
    perm = moe_permute(idx, E, x, out=out)
    assert perm is out
    check_perm(perm, idx, E)
    N = int(perm.offsets[-1])
    for p in range(N):
        np.testing.assert_array_equal(perm.x_perm[p], x[perm.order[p] // k])
    assert (perm.x_perm[N:].astype(np.float32) == 7.0).all(), "rows from offsets[E] on are not touched"
    assert perm.x_perm.dtype == x.dtype


def test_explain_problem_and_rule():
    idx = np.zeros((3, 2), np.int32)
    d = ds4kern.explain("moe_permute", idx, 4, np.zeros((3, 8), BFLOAT16))
    assert d.chosen.name == "reference" and d.problem.copy_bytes == 16 and d.problem.dtype == "bfloat16"
    assert ds4kern.explain("moe_permute", idx, 4, np.zeros((3, 8), np.float32)[:, 1:]).problem.copy_bytes == 4
    assert ds4kern.explain("moe_permute", idx, 4).problem.copy_bytes == 0
    from ds4kern.ops.moe.api import MoePermuteProblem
    from ds4kern.ops.moe.rule import CHUNKED_MIN_ENTRIES, permute_rule

    both = frozenset({"single_block", "chunked"})
    small = MoePermuteProblem("cuda", 2048, 256, "", 0, 228 * 1024)
    large = MoePermuteProblem("cuda", max(CHUNKED_MIN_ENTRIES, 1), 256, "", 0, 228 * 1024)
    assert permute_rule(small, both)[0] == ("single_block" if CHUNKED_MIN_ENTRIES > 2048 else "chunked")
    assert permute_rule(large, both)[0] == "chunked"


def test_cuda_variants_refuse_what_they_cannot_run():
    from ds4kern.core.registry import registry
    from ds4kern.ops.moe.api import MoePermuteProblem

    for name in ("single_block", "chunked"):
        v = registry.get("moe_permute", name)
        assert v.supports(MoePermuteProblem("cuda", 64, 1024, "", 0, 227 * 1024)) is None
        assert "1024" in v.supports(MoePermuteProblem("cuda", 64, 1025, "", 0, 227 * 1024))
    small_device = MoePermuteProblem("cuda", 64, 1024, "", 0, 48 * 1024)
    assert "shared memory" in registry.get("moe_permute", "single_block").supports(small_device)
    assert registry.get("moe_permute", "chunked").supports(small_device) is None


def test_kernel_constants_mirror_python():
    assert int(source_define("moe/permute.cu", "DS4_MOE_MAX_EXPERTS")) == K.MAX_EXPERTS
    assert int(source_define("moe/permute.cu", "DS4_MOE_SUB")) == K.SUB
    assert int(source_define("moe/scatter.cu", "DS4_MOE_SCATTER_THREADS")) == K.SCATTER_THREADS
    assert int(source_define("moe/unpermute.cu", "DS4_MOE_UNPERMUTE_THREADS")) == K.UNPERMUTE_THREADS


# -- moe_unpermute ------------------------------------------------------------------------------


def _combine_inputs(rng, T, k, E, D, dtype, skip=0.2, extra_rows=0):
    idx = make_indices(rng, T, k, E, skip)
    perm = moe_permute(idx, E)
    y = make_rows(rng, T * k + extra_rows, D, dtype)
    w = rng.random((T, k)).astype(np.float32)
    return perm, y, w


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("T,k,E,D", [(1, 1, 1, 1), (9, 6, 16, 40), (31, 3, 7, 13), (64, 8, 384, 8)])
def test_unpermute_matches_independent(rng, T, k, E, D, dtype):
    perm, y, w = _combine_inputs(rng, T, k, E, D, dtype)
    got = moe_unpermute(y, perm, w)
    assert got.dtype == y.dtype and got.shape == (T, D)
    exact = fixed_order_float32(y, perm.slot, w)
    np.testing.assert_array_equal(got, exact.astype(y.dtype))
    f32 = moe_unpermute(y, perm, w, out_dtype="float32")
    np.testing.assert_array_equal(f32, exact)
    np.testing.assert_allclose(f32, float64_sum(y, perm.slot, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [np.float32, "bfloat16", np.float16, BFLOAT16])
def test_unpermute_out_dtypes(rng, out_dtype):
    perm, y, w = _combine_inputs(rng, 20, 4, 9, 16, "float32")
    got = moe_unpermute(y, perm, w, out_dtype=out_dtype)
    want = fixed_order_float32(y, perm.slot, w)
    assert got.dtype == (BFLOAT16 if out_dtype in ("bfloat16", BFLOAT16) else np.dtype(out_dtype))
    np.testing.assert_array_equal(got, want.astype(got.dtype))


def test_unpermute_layouts_zero_tokens_and_extra_rows(rng):
    T, k, E, D = 12, 3, 5, 10
    idx = make_indices(rng, T, k, E)
    idx[4] = -1  # a token with no expert: zeros
    perm = moe_permute(idx, E)
    wide = make_rows(rng, 2 * (T * k + 6), D + 3, "bfloat16")
    y = wide[::2, 2:2 + D]  # strided rows, more rows than N
    w = np.asfortranarray(rng.random((T, k)).astype(np.float32))
    out_wide = np.full((T, D + 7), 9.0, np.float32)
    got = moe_unpermute(y, perm, w, out=out_wide[:, 3:3 + D])
    np.testing.assert_array_equal(got, fixed_order_float32(y, perm.slot, w))
    assert (got[4] == 0).all() and (out_wide[:, :3] == 9.0).all() and (out_wide[:, 3 + D:] == 9.0).all()


def test_round_trip_k1(rng):
    T, E, D = 50, 6, 12
    x = make_rows(rng, T, D, "bfloat16")
    perm = moe_permute(make_indices(rng, T, 1, E), E, x)
    back = moe_unpermute(perm.x_perm, perm, np.ones((T, 1), np.float32))
    np.testing.assert_array_equal(back, x)


def test_reference_functions_match_ops(rng):
    idx = make_indices(rng, 20, 3, 7, 0.2)
    perm = moe_permute(idx, 7)
    for got, want in zip((perm.counts, perm.offsets, perm.order, perm.slot), reference_permutation(idx, 7)):
        np.testing.assert_array_equal(got, want)
    y = make_rows(rng, 60, 5, "float16")
    w = rng.random((20, 3)).astype(np.float32)
    np.testing.assert_array_equal(moe_unpermute(y, perm, w), reference_unpermute(y, perm.slot, w, np.float16))


# -- bad input ----------------------------------------------------------------------------------

IDX = np.array([[0, 1], [2, -1], [1, 1]], np.int32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(indices=IDX.astype(np.int64)), TypeError, "indices must be int32"),
    (dict(indices=np.zeros(4, np.int32)), ValueError, r"indices must have shape \[T, k\]"),
    (dict(indices=np.zeros((3, 0), np.int32)), ValueError, r"indices must have shape \[T, k\] with k >= 1"),
    (dict(indices=np.array([[0, 3]], np.int32)), ValueError, r"indices\[0, 1\] = 3"),
    (dict(indices=np.array([[0, -2]], np.int32)), ValueError, r"indices must be -1 .* indices\[0, 1\] = -2"),
    (dict(num_experts=0), ValueError, "num_experts must be an int >= 1"),
    (dict(num_experts=3.0), TypeError, "num_experts must be an int"),
    (dict(num_experts=True), TypeError, "num_experts must be an int"),
    (dict(x=np.zeros((3, 4), np.int32)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(x=np.zeros((2, 4), np.float32)), ValueError, r"x must have shape \[T, D\] with T = 3"),
    (dict(x=np.zeros(4, np.float32)), ValueError, r"x must be a 2-D"),
    (dict(x=np.zeros((3, 8), np.float32)[:, ::2]), ValueError, "x: each row must be contiguous"),
    (dict(errors=np.zeros(1, np.int32)), TypeError, "errors= is a device counter"),
    (dict(out=(1, 2)), TypeError, "out must be a MoePermutation"),
])
def test_permute_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(indices=IDX, num_experts=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        moe_permute(args.pop("indices"), args.pop("num_experts"), **args)


def _out(T=3, k=2, E=3, x_perm=None, **over):
    arrs = dict(counts=np.zeros(E, np.int32), offsets=np.zeros(E + 1, np.int32), order=np.zeros(T * k, np.int32),
                slot=np.zeros((T, k), np.int32), x_perm=x_perm, num_tokens=T, k=k, num_experts=E)
    arrs.update(over)
    return MoePermutation(**arrs)


@pytest.mark.parametrize("out,x,exc,match", [
    (_out(num_experts=4), None, ValueError, "out.num_experts is 4 but this call has 3"),
    (_out(counts=np.zeros(4, np.int32)), None, ValueError, r"out.counts must have shape \[3\]"),
    (_out(order=np.zeros(6, np.int64)), None, TypeError, "out.order must be int32"),
    (_out(slot=np.zeros((2, 3), np.int32).T), None, ValueError, "out.slot must be C-contiguous"),
    (_out(x_perm=np.zeros((6, 4), np.float32)), None, ValueError, "out.x_perm must be None when x is not given"),
    (_out(), np.zeros((3, 4), np.float32), ValueError, "out.x_perm is None but x is given"),
    (_out(x_perm=np.zeros((6, 4), np.float16)), np.zeros((3, 4), np.float32), TypeError,
     "out.x_perm must have x's dtype"),
    (_out(x_perm=np.zeros((5, 4), np.float32)), np.zeros((3, 4), np.float32), ValueError,
     r"out.x_perm must have shape \[T \* k, D\]"),
])
def test_permute_bad_out(out, x, exc, match):
    with pytest.raises(exc, match=match):
        moe_permute(IDX, 3, x, out=out)


def test_permute_output_overlapping_input_is_refused():
    buf = np.zeros((6, 4), np.float32)
    with pytest.raises(ValueError, match="out.x_perm overlaps x"):
        moe_permute(IDX, 3, buf[:3], out=_out(x_perm=buf))
    ro = _out()
    ro.counts.flags.writeable = False
    with pytest.raises(ValueError, match="out.counts is read-only"):
        moe_permute(IDX, 3, out=ro)


def test_unpermute_bad_input_names_the_argument():
    perm = moe_permute(IDX, 3)
    y = np.zeros((6, 4), np.float32)
    w = np.ones((3, 2), np.float32)
    cases = [
        (lambda: moe_unpermute(y.astype(np.int32), perm, w), TypeError, "y_perm must be float32"),
        (lambda: moe_unpermute(y[:, ::2], perm, w), ValueError, "y_perm: each row must be contiguous"),
        (lambda: moe_unpermute(y, perm.slot, w), TypeError, "perm must be the MoePermutation"),
        (lambda: moe_unpermute(y, perm, w.astype(np.float64)), TypeError, "weights must be float32"),
        (lambda: moe_unpermute(y, perm, w[:2]), ValueError, r"weights must have shape \[T, k\] = \[3, 2\]"),
        (lambda: moe_unpermute(y[:4], perm, w), ValueError, "perm.slot entries must be -1 or rows of y_perm"),
        (lambda: moe_unpermute(y, perm, w, out_dtype=np.int8), TypeError, "out_dtype must be"),
        (lambda: moe_unpermute(y, perm, w, out=np.zeros((3, 5), np.float32)), ValueError,
         r"out must have shape \[T, D\] = \[3, 4\]"),
        (lambda: moe_unpermute(y, perm, w, out=np.zeros((3, 4), np.float32), out_dtype="bfloat16"), TypeError,
         "out has dtype float32 but out_dtype=bfloat16"),
        (lambda: moe_unpermute(y, perm, w, out=y[:3]), ValueError, "out overlaps y_perm"),
        (lambda: moe_unpermute(y, perm, w, errors=np.zeros(1, np.int32)), TypeError, "errors= is a device counter"),
    ]
    bad_slot = MoePermutation(perm.counts, perm.offsets, perm.order, perm.slot.astype(np.int64), None, 3, 2, 3)
    cases.append((lambda: moe_unpermute(y, bad_slot, w), TypeError, "perm.slot must be int32"))
    short = MoePermutation(perm.counts, perm.offsets, perm.order, perm.slot[:2], None, 3, 2, 3)
    cases.append((lambda: moe_unpermute(y, short, w), ValueError, r"perm.slot must have shape \[T, k\]"))
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
