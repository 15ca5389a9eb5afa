"""grouped_linear (rows grouped by expert times each group's matrix): the reference against float64,
validation, and on the GPU every variant against float64 with poisoned outputs, a dense Flash-size
projection, the grouped wo_a shape and CUDA-graph capture of the grouped variant."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16

POISON = 0x7FC1  # a bf16 NaN payload no kernel writes


def case(rng, counts, O, I):
    E = len(counts)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = rng.standard_normal((int(off[-1]) + 3, I)).astype(BFLOAT16)  # 3 rows beyond offsets[E]
    w = (rng.standard_normal((E, O, I)) / np.sqrt(I)).astype(BFLOAT16)
    return x, off, w


def want(x, off, w):
    y = np.zeros((x.shape[0], w.shape[1]))
    for e in range(w.shape[0]):
        lo, hi = off[e], off[e + 1]
        y[lo:hi] = x[lo:hi].astype(np.float64) @ w[e].astype(np.float64).T
    return y


@pytest.mark.parametrize("counts", [[5], [3, 0, 7, 1], [0, 0], [1] * 9])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_reference_matches_float64(counts, out_dtype):
    rng = np.random.default_rng(len(counts))
    x, off, w = case(rng, counts, 64, 96)
    y = ds4kern.grouped_linear(x, off, w, out_dtype=out_dtype)
    n = off[-1]
    tol = 1e-5 if out_dtype == "float32" else 1e-2
    ref = want(x, off, w)
    np.testing.assert_allclose(y[:n].astype(np.float64), ref[:n], rtol=tol, atol=tol * max(1, np.abs(ref).max()))
    assert not y[n:].astype(np.float64).any()


@pytest.mark.parametrize("args,kw,match", [
    (lambda x, o, w: (x.astype(np.float32), o, w), {}, "x must be bfloat16"),
    (lambda x, o, w: (x, o, w[:, :, :8]), {}, r"w must have shape \[E, O, I\]"),
    (lambda x, o, w: (x, o[:-1], w), {}, r"offsets must have shape \[E \+ 1\]"),
    (lambda x, o, w: (x, o.astype(np.float32), w), {}, "offsets must be int32 or int64"),
    (lambda x, o, w: (x, o[::-1].copy(), w), {}, "offsets"),
    (lambda x, o, w: (x, o, w), {"out_dtype": "int8"}, "out_dtype must be"),
    (lambda x, o, w: (x, o, w), {"out": np.zeros((2, 2), np.float32)}, "out must be C-contiguous of shape"),
])
def test_validation_names_the_argument(args, kw, match):
    x, off, w = case(np.random.default_rng(0), [2, 3], 64, 64)
    with pytest.raises((TypeError, ValueError), match=match):
        ds4kern.grouped_linear(*args(x, off, w), **kw)


def test_split_plan():
    from ds4kern.ops.expert_mlp import kernels as K
    from ds4kern.ops.expert_mlp.linear import LinearProblem, _rule, _split_supports, _splits

    def prob(O, I, N):
        return LinearProblem("cuda", N, 1, O, I, "float32", True, True, 232448, 132, 90)

    assert _split_supports(prob(64, 64, 1)) and "no split" in _split_supports(prob(64, 64, 1))
    for O, I, N in [(1024, 4096, 1), (512, 4096, 64), (4096, 8192, 1), (64, 4096, 256), (32768, 1024, 1)]:
        S = _splits(prob(O, I, N))
        assert S in K.SPLITS and I % (S * K.ALIGN) == 0
    ok = frozenset({"grouped", "split", "naive"})
    assert _rule(prob(1024, 4096, 1), ok)[0] == "split"        # 16 tiles: too few blocks alone
    assert _rule(prob(32768, 1024, 1), ok)[0] == "grouped"     # 512 tiles fill the device
    assert _rule(prob(1024, 4096, 1), ok - {"split"})[0] == "grouped"


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("counts,O,I", [([7], 64, 64), ([3, 0, 9, 33, 1], 128, 192), ([1] * 8, 1024, 4096),
                                        ([100, 64, 1], 512, 256), ([1], 1024, 4096), ([256], 64, 4096),
                                        ([5, 2], 4096, 8192)])
@pytest.mark.parametrize("variant", ["naive", "grouped", "split"])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_variants_match_float64(counts, O, I, variant, out_dtype):
    import cupy as cp
    rng = np.random.default_rng(O + I)
    x, off, w = case(rng, counts, O, I)
    d = ds4kern.explain("grouped_linear", cp.asarray(x), cp.asarray(off), cp.asarray(w))
    why = next(c.rejected for c in d.candidates if c.variant.name == variant)
    if why:
        pytest.skip(f"{variant}: {why}")
    dt = np.float32 if out_dtype == "float32" else BFLOAT16
    out = cp.empty((x.shape[0], O), dt)
    out.view(np.uint16 if dt is BFLOAT16 else np.uint32).fill(POISON if dt is BFLOAT16 else 0x7FC00001)
    ds4kern.grouped_linear(cp.asarray(x), cp.asarray(off), cp.asarray(w), out=out, variant=variant)
    got = cp.asnumpy(out).astype(np.float64)
    n = off[-1]
    ref = want(x, off, w)[:n]
    assert not np.isnan(got[:n]).any(), "rows left unwritten"
    err = np.linalg.norm(got[:n] - ref) / np.linalg.norm(ref)
    assert err < (1e-5 if out_dtype == "float32" else 5e-3), err
    assert np.isnan(got[n:]).all(), "rows beyond offsets[E] were written"


@pytest.mark.gpu
def test_grouped_is_capturable_and_one_launch():
    import cupy as cp
    from graph_nodes import count_kernel_nodes
    rng = np.random.default_rng(3)
    x, off, w = case(rng, [64], 4096, 1024)
    xd, od, wd = cp.asarray(x), cp.asarray(off), cp.asarray(w)
    out = cp.empty((x.shape[0], 4096), np.float32)
    assert count_kernel_nodes(cp, lambda: ds4kern.grouped_linear(xd, od, wd, out=out, variant="grouped")) == 1
    ref = want(x, off, w)[:64]
    assert np.linalg.norm(cp.asnumpy(out)[:64] - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.gpu
def test_property_every_supported_variant():
    """Random groups, row counts, widths (multiples of 64 and not) and output dtypes: every CUDA
    variant the registry says can run the problem is within float32 / bf16 rounding of float64,
    writes every routed row and no row beyond offsets[E]."""
    import cupy as cp
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from conftest import supported_variants

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.sampled_from([64, 128, 192, 1024, 72]),
           st.sampled_from([64, 256, 2048, 4096, 96]), st.sampled_from(["float32", "bfloat16"]),
           st.integers(0, 2 ** 31 - 1))
    def check(counts, O, I, out_dtype, seed):
        rng = np.random.default_rng(seed)
        x, off, w = case(rng, counts, O, I)
        xd, od, wd = cp.asarray(x), cp.asarray(off), cp.asarray(w)
        names = supported_variants("grouped_linear", xd, od, wd, out_dtype=out_dtype)
        assert "naive" in names
        n = int(off[-1])
        ref = want(x, off, w)[:n]
        for name in names:
            dt = np.float32 if out_dtype == "float32" else BFLOAT16
            out = cp.empty((x.shape[0], O), dt)
            out.view(np.uint16 if dt is BFLOAT16 else np.uint32).fill(POISON if dt is BFLOAT16 else 0x7FC00001)
            ds4kern.grouped_linear(xd, od, wd, out=out, variant=name)
            got = cp.asnumpy(out).astype(np.float64)
            assert not np.isnan(got[:n]).any(), f"{name}: rows left unwritten"
            assert np.isnan(got[n:]).all(), f"{name}: rows beyond offsets[E] written"
            if n:
                err = np.linalg.norm(got[:n] - ref) / max(np.linalg.norm(ref), 1e-30)
                assert err < (1e-5 if out_dtype == "float32" else 5e-3), (name, err)

    check()
