"""Hyper-connections on the host: the float64 reference against an independent loop formulation
(hc_cases.loop_*), the doubly-stochastic comb, hc_post_pre = hc_post then hc_pre, validation,
NaN isolation, in-place updates, explain, and the dispatch rule over the CUDA variants (decided
without a GPU)."""

import math

import numpy as np
import pytest
from hc_cases import DTYPES, bf16_close, loop_post, loop_pre, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
import ds4kern.ops.hyper_connections  # noqa: F401  (registers the ops before ds4kern imports them)
from ds4kern.core import dispatch
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.kernels import source_define
from ds4kern.ops.hyper_connections import HcProblem, hc_post, hc_post_pre, hc_pre
from ds4kern.ops.hyper_connections import kernels as K
from ds4kern.ops.hyper_connections import rule as R

SIZES = [(B, D) for B in (1, 3, 64) for D in (4096, 7168)]
F32_TOL = dict(rtol=1e-6, atol=1e-7)  # float32 outputs of float64 values


def mix_args(inp):
    return inp["hc_fn"], inp["hc_scale"], inp["hc_base"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
def test_hc_pre_matches_loop(rng, B, D, dtype):
    inp = make_inputs(rng, B, D, dtype)
    x_in, post, comb = hc_pre(inp["X"], *mix_args(inp))
    assert x_in.dtype == BFLOAT16 and x_in.shape == (B, D)
    assert post.dtype == np.float32 and post.shape == (B, 4)
    assert comb.dtype == np.float32 and comb.shape == (B, 4, 4)
    wx, wp, wc = loop_pre(inp["X"], *mix_args(inp))
    bf16_close(x_in, wx)
    np.testing.assert_allclose(post, wp, **F32_TOL)
    np.testing.assert_allclose(comb, wc, **F32_TOL)


@pytest.mark.parametrize("dtype,y_dtype", [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
def test_hc_post_matches_loop(rng, B, D, dtype, y_dtype):
    inp = make_inputs(rng, B, D, dtype, y_dtype)
    got = hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    assert got.dtype == DTYPES[dtype] and got.shape == (B, 4, D)
    want = loop_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    if dtype == "float32":
        np.testing.assert_allclose(got, want, **F32_TOL)
    else:
        bf16_close(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,D", [(3, 4096), (64, 7168)])
def test_hc_post_pre_is_post_then_pre(rng, B, D, dtype):
    inp = make_inputs(rng, B, D, dtype)
    new, x_in, post, comb = hc_post_pre(inp["y"], inp["X"], inp["post"], inp["comb"], *mix_args(inp),
                                        sinkhorn_iters=13, hc_eps=1e-5)
    want_new = hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    want = hc_pre(want_new, *mix_args(inp), sinkhorn_iters=13, hc_eps=1e-5)
    np.testing.assert_array_equal(new, want_new)
    for got, w in zip((x_in, post, comb), want):
        np.testing.assert_array_equal(got, w)
    # and against the loops, composed
    wx, wp, wc = loop_pre(want_new, *mix_args(inp), hc_eps=1e-5, iters=13)
    bf16_close(x_in, wx)
    np.testing.assert_allclose(comb, wc, **F32_TOL)


@pytest.mark.parametrize("scale", [(0.7, 0.9, 1.1), (1.0, 1.0, 3.0)])
def test_comb_is_doubly_stochastic(rng, scale):
    """Columns sum to 1 (the last Sinkhorn step normalises them, up to hc_eps); rows to within
    the convergence of 20 iterations (the model's count: not exact for peaked matrices)."""
    inp = make_inputs(rng, 256, 256)
    _, post, comb = hc_pre(inp["X"], inp["hc_fn"], scale, inp["hc_base"])
    assert (comb > 0).all() and ((post > 0) & (post < 2)).all()
    np.testing.assert_allclose(comb.sum(axis=1), 1.0, atol=1e-5)
    rows = comb.sum(axis=2)
    assert np.abs(rows - 1).max() < 0.1 and np.abs(rows - 1).mean() < 1e-2


def test_more_iterations_converge(rng):
    inp = make_inputs(rng, 64, 64)
    dev = []
    for iters in (1, 5, 20, 200):
        _, _, comb = hc_pre(inp["X"], *mix_args(inp), sinkhorn_iters=iters)
        dev.append(np.abs(comb.sum(axis=2) - 1).max())
    assert dev[0] > dev[1] > dev[2] > dev[3] and dev[3] < 1e-4


def test_eps_and_iters_are_used(rng):
    inp = make_inputs(rng, 5, 64)
    x_in, post, comb = hc_pre(inp["X"], *mix_args(inp), norm_eps=0.5, hc_eps=0.01, sinkhorn_iters=3)
    wx, wp, wc = loop_pre(inp["X"], *mix_args(inp), norm_eps=0.5, hc_eps=0.01, iters=3)
    bf16_close(x_in, wx)
    np.testing.assert_allclose(post, wp, **F32_TOL)
    np.testing.assert_allclose(comb, wc, **F32_TOL)


def test_nan_stays_in_its_token(rng):
    inp = make_inputs(rng, 6, 64)
    X = inp["X"].copy()
    X[2, 3, 17] = np.nan
    x_in, post, comb = hc_pre(X, *mix_args(inp))
    clean = hc_pre(np.delete(X, 2, axis=0), *mix_args(inp))
    assert np.isnan(x_in[2].astype(np.float32)).all() and np.isnan(post[2]).all() and np.isnan(comb[2]).all()
    for got, want in zip((x_in, post, comb), clean):
        np.testing.assert_array_equal(np.delete(got, 2, axis=0), want)
    y = inp["y"].copy()
    y[4, 9] = np.nan
    new = hc_post(y, X, inp["post"], inp["comb"])
    bad = np.zeros(new.shape, bool)
    bad[2, :, 17] = True
    bad[4, :, 9] = True
    assert np.isnan(new[bad]).all() and not np.isnan(new[~bad]).any()


def test_in_place_post_and_post_pre(rng):
    inp = make_inputs(rng, 4, 128, "bfloat16")
    want = hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    X = inp["X"].copy()
    got = hc_post(inp["y"], X, inp["post"], inp["comb"], out=X)
    assert got is X
    np.testing.assert_array_equal(X, want)
    want4 = hc_post_pre(inp["y"], inp["X"], inp["post"], inp["comb"], *mix_args(inp))
    X = inp["X"].copy()
    got4 = hc_post_pre(inp["y"], X, inp["post"], inp["comb"], *mix_args(inp), out=(X, None, None, None))
    assert got4[0] is X
    for g, w in zip(got4, want4):
        np.testing.assert_array_equal(g, w)


def test_outputs_into_given_buffers_and_strided_inputs(rng):
    inp = make_inputs(rng, 7, 96)
    want = hc_pre(inp["X"], *mix_args(inp))
    wide = np.full((7, 6, 100), np.nan, np.float32)
    wide[:, 1:5, 2:98] = inp["X"]
    outs = (np.empty((7, 96), BFLOAT16), np.empty((7, 4), np.float32), np.empty((7, 4, 4), np.float32))
    got = hc_pre(wide[:, 1:5, 2:98], *mix_args(inp), out=outs)
    assert all(g is o for g, o in zip(got, outs))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    skip = np.full((7, 4, 192), np.nan, np.float32)
    skip[:, :, ::2] = inp["X"]
    for g, w in zip(hc_pre(skip[:, :, ::2], *mix_args(inp)), want):
        np.testing.assert_array_equal(g, w)


def test_empty_batch(rng):
    inp = make_inputs(rng, 0, 64)
    x_in, post, comb = hc_pre(inp["X"], *mix_args(inp))
    assert x_in.shape == (0, 64) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
    assert hc_post(inp["y"], inp["X"], inp["post"], inp["comb"]).shape == (0, 4, 64)


# -- validation -----------------------------------------------------------------------------


def _bad_pre(rng, **change):
    inp = make_inputs(rng, 3, 64)
    kw = dict(X=inp["X"], hc_fn=inp["hc_fn"], hc_scale=inp["hc_scale"], hc_base=inp["hc_base"])
    extra = {k: change.pop(k) for k in list(change) if k in ("norm_eps", "hc_eps", "sinkhorn_iters", "out")}
    kw.update(change)
    return hc_pre(kw["X"], kw["hc_fn"], kw["hc_scale"], kw["hc_base"], **extra)


@pytest.mark.parametrize("change,exc,word", [
    (dict(X=np.ones((3, 4, 64), np.float16)), TypeError, "X must be float32 or bfloat16"),
    (dict(X=np.ones((3, 3, 64), np.float32)), ValueError, r"X must have shape \[B, 4, D\]"),
    (dict(X=np.ones((3, 256), np.float32)), ValueError, r"X must have shape \[B, 4, D\]"),
    (dict(X=np.ones((3, 4, 0), np.float32)), ValueError, "D >= 1"),
    (dict(hc_fn=np.ones((24, 255), np.float32)), ValueError, r"hc_fn must have shape \[24, 256\]"),
    (dict(hc_fn=np.ones((24, 256), BFLOAT16)), TypeError, "hc_fn must be float32"),
    (dict(hc_base=np.ones(23, np.float32)), ValueError, "hc_base"),
    (dict(hc_base=np.ones(24, np.float64)), TypeError, "hc_base must be float32"),
    (dict(hc_scale=(1.0, 2.0)), ValueError, "hc_scale must have shape"),
    (dict(hc_scale=(1.0, math.inf, 1.0)), ValueError, "hc_scale must be finite"),
    (dict(hc_scale=np.array([1.0, 1.0, np.nan])), ValueError, "hc_scale must be finite"),
    (dict(hc_scale=("a", "b", "c")), TypeError, "hc_scale"),
    (dict(hc_scale=object()), TypeError, "hc_scale"),
    (dict(norm_eps=-1e-6), ValueError, "norm_eps"),
    (dict(hc_eps=math.nan), ValueError, "hc_eps"),
    (dict(norm_eps="1e-6"), TypeError, "norm_eps"),
    (dict(sinkhorn_iters=0), ValueError, "sinkhorn_iters"),
    (dict(sinkhorn_iters=2.0), TypeError, "sinkhorn_iters"),
    (dict(sinkhorn_iters=True), TypeError, "sinkhorn_iters"),
    (dict(out=(np.empty((3, 64), np.float32), None, None)), TypeError, r"out\[0\] \(x_in\) must be bfloat16"),
    (dict(out=(None, np.empty((3, 5), np.float32), None)), ValueError, r"out\[1\] \(post\) must have shape"),
    (dict(out=(None, None, np.empty((3, 4, 4), np.float32)[:, ::-1])), ValueError, "C-contiguous"),
    (dict(out=(None, None)), TypeError, "out must be a tuple"),
])
def test_hc_pre_validation(rng, change, exc, word):
    with pytest.raises(exc, match=word):
        _bad_pre(rng, **change)


def test_hc_pre_rejects_outputs_overlapping_inputs(rng):
    inp = make_inputs(rng, 3, 64)
    buf = np.empty(24 * 256 + 12, np.float32)
    fn = buf[:24 * 256].reshape(24, 256)
    fn[...] = inp["hc_fn"]
    with pytest.raises(ValueError, match=r"out\[1\] \(post\) overlaps hc_fn"):
        hc_pre(inp["X"], fn, inp["hc_scale"], inp["hc_base"], out=(None, buf[:12].reshape(3, 4), None))


@pytest.mark.parametrize("what,exc,word", [
    ("y_shape", ValueError, r"y must have shape \[B, D\]"),
    ("y_dtype", TypeError, "y must be float32 or bfloat16"),
    ("post_shape", ValueError, "post must have shape"),
    ("comb_dtype", TypeError, "comb must be float32"),
    ("out_dtype", TypeError, "out must have X's dtype"),
    ("out_shape", ValueError, "out must have X's shape"),
    ("out_last_axis", ValueError, "last axis must be contiguous"),
    ("out_overlaps_X", ValueError, "out overlaps X"),
    ("out_overlaps_y", ValueError, "out overlaps y"),
])
def test_hc_post_validation(rng, what, exc, word):
    inp = make_inputs(rng, 3, 64, "bfloat16")
    y, X, post, comb, out = inp["y"], inp["X"], inp["post"], inp["comb"], None
    if what == "y_shape":
        y = y[:, :32]
    elif what == "y_dtype":
        y = y.astype(np.float16)
    elif what == "post_shape":
        post = post[:2]
    elif what == "comb_dtype":
        comb = comb.astype(np.float64)
    elif what == "out_dtype":
        out = np.empty((3, 4, 64), np.float32)
    elif what == "out_shape":
        out = np.empty((3, 4, 63), BFLOAT16)
    elif what == "out_last_axis":
        out = np.empty((3, 4, 128), BFLOAT16)[:, :, ::2]
    elif what == "out_overlaps_X":
        buf = np.empty((4, 4, 64), BFLOAT16)
        buf[:3] = X
        X, out = buf[:3], buf[1:]
    elif what == "out_overlaps_y":
        buf = np.empty(3 * 4 * 64, BFLOAT16)
        y = buf[:3 * 64].reshape(3, 64)
        y[...] = inp["y"]
        out = buf.reshape(3, 4, 64)
    with pytest.raises(exc, match=word):
        hc_post(y, X, post, comb, out=out)


def test_hc_post_pre_validation(rng):
    inp = make_inputs(rng, 3, 64)
    args = (inp["y"], inp["X"], inp["post"], inp["comb"]) + mix_args(inp)
    with pytest.raises(ValueError, match=r"out\[2\] \(post\) overlaps post"):
        hc_post_pre(*args, out=(None, None, inp["post"], None))
    with pytest.raises(ValueError, match=r"hc_fn must have shape \[24, 256\]"):
        hc_post_pre(*args[:4], inp["hc_fn"][:, :128], *args[5:])
    with pytest.raises(ValueError, match="hc_scale must be finite"):
        hc_post_pre(*args[:5], (1.0, 1.0, -math.inf), args[6])
    with pytest.raises(TypeError, match="out must be a tuple"):
        hc_post_pre(*args, out=inp["X"])
    with pytest.raises(ValueError, match=r"X must have shape \[B, 4, D\]"):
        hc_post_pre(inp["y"], inp["X"][:, :2], *args[2:])


def test_explain_and_variants(rng):
    inp = make_inputs(rng, 3, 4096)
    d = ds4kern.explain("hc_pre", inp["X"], *mix_args(inp))
    assert d.chosen.name == "reference" and "D=4096" in str(d)
    assert {c.variant.name for c in d.candidates} == {"reference", "naive", "grouped", "split", "tiled"}
    d = ds4kern.explain("hc_post_pre", inp["y"], inp["X"], inp["post"], inp["comb"], *mix_args(inp))
    assert d.chosen.name == "reference"
    d = ds4kern.explain("hc_post", inp["y"], inp["X"], inp["post"], inp["comb"])
    assert d.chosen.name == "reference" and {c.variant.name for c in d.candidates} == {"reference", "naive"}
    with pytest.raises(ValueError, match="hc_scale must be finite"):
        ds4kern.explain("hc_pre", inp["X"], inp["hc_fn"], (1.0, math.nan, 1.0), inp["hc_base"])


# -- the rule over the CUDA variants, decided on the host ------------------------------------


def gpu_problem(B, D=4096, vec=4, dtype="bfloat16", y_dtype=""):
    from ds4kern.ops.hyper_connections.api import bucket_tokens

    return HcProblem("cuda", bucket_tokens(B), D, dtype, y_dtype, vec)


@pytest.mark.parametrize("op", ["hc_pre", "hc_post_pre"])
@pytest.mark.parametrize("D", [4096, 7168])
def test_rule_picks_by_token_count(op, D):
    y = "bfloat16" if op == "hc_post_pre" else ""
    tiled_min = R.POST_PRE_TILED_MIN_TOKENS if y else R.TILED_MIN_TOKENS
    for B in (1, 8, 64, 128, 200, 256, 512, 1024, 4096):
        d = dispatch.decide(op, gpu_problem(B, D, y_dtype=y))
        b = gpu_problem(B, D).tokens_bucket
        want = "split" if b <= R.SPLIT_MAX_TOKENS else "tiled" if b >= tiled_min else "naive"
        assert d.chosen.name == want, (B, str(d))
        # where tiled cannot run (scalar accesses): grouped at large B, with its first setting
        d = dispatch.decide(op, gpu_problem(B, D, vec=1, y_dtype=y))
        assert "tiled" not in d.chosen.name
        if b > R.SPLIT_MAX_TOKENS and b >= R.GROUPED_MIN_TOKENS:
            assert d.chosen.name == "grouped" and d.chosen.config == (("tokens_per_block", K.GROUPED_TOKENS[0]),)


def test_rule_without_split_or_grouped():
    # D too small to split: naive at small B; one token: grouped has nothing to group
    d = dispatch.decide("hc_pre", gpu_problem(1, D=64))
    assert d.chosen.name == "naive"
    assert "too few to split" in next(c.rejected for c in d.candidates if c.variant.name == "split")
    assert "nothing to group" in next(c.rejected for c in d.candidates if c.variant.name == "grouped")
    assert R.rule(gpu_problem(4096), frozenset({"naive"}))[0] == "naive"


def test_split_plan():
    for B in (1, 3, 8, 64, 200, 4096):
        for D, vec in ((4096, 4), (7168, 4), (4096, 1), (512, 4)):
            tok, slices = K.split_plan(B, D, vec, 132)
            assert tok == K.split_tokens(B) and 1 <= slices <= max(1, K.split_max_slices(D, vec))
            assert slices == 1 or (D // vec) // slices >= K.SPLIT_SLICE_CHUNKS
    assert K.split_plan(1, 4096, 4, 132) == (1, 16)  # 16 blocks of 64 chunks for one Flash token
    assert K.split_plan(1, 4096, 4, 132, slice_chunks=16) == (1, 64)
    for B in (1, 64, 4096):
        for D, vec in ((4096, 4), (7168, 4), (4096, 1), (512, 4)):
            for c in K.SPLIT_SLICE_CHOICES:
                tok, slices = K.split_plan(B, D, vec, 132, c)
                assert 1 <= slices <= max(1, K.split_max_slices(D, vec, c))
                assert slices == 1 or (D // vec) // slices >= c


def test_split_configs():
    from ds4kern.ops.hyper_connections import variants as V
    assert V._split_configs(gpu_problem(1)) == [{"slice_chunks": c} for c in K.SPLIT_SLICE_CHOICES]
    assert V._split_configs(gpu_problem(1, D=256)) == [{"slice_chunks": 16}]  # 64 chunks: only 16 splits them


def test_python_mirrors_of_cuda_defines():
    assert int(source_define(K.POST.source, "DS4_HC_POST_THREADS")) == K.POST_THREADS
    assert int(source_define(K.PRE.source, "DS4_HC_SLOT")) == K.SLOT
    assert int(source_define(K.PRE.source, "DS4_HC_MIX")) == 24
    assert int(source_define(K.PRE_TILED.source, "DS4_HC_TILE_TOKENS")) == K.TILE_TOKENS
    assert int(source_define(K.PRE_TILED.source, "DS4_HC_TILE_CH")) == K.TILE_CH
    assert int(source_define(K.PRE_TILED.source, "DS4_HC_TILE_THREADS")) == K.TILE_THREADS


def test_tiled_plan_and_support():
    from ds4kern.ops.hyper_connections import variants as V
    for B in (1, 3, 64, 1024, 4096, 10000):
        for D in (4096, 7168, 512):
            for item in (2, 4):
                ks = K.tiled_slices(B, D, item, 132)
                assert 1 <= ks <= (4 * D // K.TILE_CH) // K.TILE_MIN_CHUNKS
                assert ks * K.SLOT * 4 <= 4 * D * item * K.TILE_PARTIAL_SHARE  # partials <= a quarter of X
                tiles = -(-B // K.TILE_TOKENS)
                assert ks == 1 or tiles * ks <= 2 * 132  # one wave of two blocks per SM, no tail
    assert K.tiled_slices(4096, 4096, 2, 132) == 16  # 16 token tiles x 16 slices = 256 <= 264 blocks
    assert K.tiled_slices(1024, 7168, 2, 132) == 66  # 4 tiles x 66 = 264: exactly one wave
    assert V._tiled_supports(gpu_problem(1024)) is None
    assert "multiple of 32" in V._tiled_supports(gpu_problem(1024, D=4100))
    assert "4-channel" in V._tiled_supports(gpu_problem(1024, vec=1))


def test_kernel_sources_declared():
    for fam in K.FAMILIES:
        code = fam.source.split("/")[-1].replace(".cu", "")
        assert all(n.startswith((f"hc_{code}<", f"hc_{code}_")) for n in fam.name_expressions), fam.source
        assert len(set(fam.name_expressions)) == len(fam.name_expressions)


# -- property: layouts and compositions on the host ----------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.integers(1, 40), st.sampled_from([1, 3, 4, 8, 36, 100, 256]), st.sampled_from(["float32", "bfloat16"]),
       st.sampled_from(["padded", "last_axis_strided", "token_major_gap"]), st.integers(0, 2**31 - 1))
def test_property_layouts_and_composition(B, D, dtype, layout, seed):
    """Any strides of X give the contiguous result; hc_post_pre equals hc_post then hc_pre."""
    rng = np.random.default_rng(seed)
    inp = make_inputs(rng, B, D, dtype)
    X = inp["X"]
    if layout == "padded":
        wide = np.full((B, 5, D + 3), np.nan, X.dtype)
        wide[:, 1:, 3:] = X
        Xv = wide[:, 1:, 3:]
    elif layout == "last_axis_strided":
        wide = np.full((B, 4, 2 * D), np.nan, X.dtype)
        wide[:, :, 1::2] = X
        Xv = wide[:, :, 1::2]
    else:
        wide = np.full((4, B + 2, D), np.nan, X.dtype)
        wide[:, 1:B + 1] = X.transpose(1, 0, 2)
        Xv = wide[:, 1:B + 1].transpose(1, 0, 2)
    want = hc_pre(X, *mix_args(inp))
    for g, w in zip(hc_pre(Xv, *mix_args(inp)), want):
        np.testing.assert_array_equal(g, w)
    new = hc_post(inp["y"], Xv, inp["post"], inp["comb"])
    fused = hc_post_pre(inp["y"], Xv, inp["post"], inp["comb"], *mix_args(inp))
    np.testing.assert_array_equal(fused[0], new)
    for g, w in zip(fused[1:], hc_pre(new, *mix_args(inp))):
        np.testing.assert_array_equal(g, w)
