"""router_topk CUDA variants against the reference backend, on fresh random inputs.

Outputs are poisoned before each run (NaN weights, -1 indices) so unwritten elements fail.
"""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.router.checks import compare_router, group_tie_rows, router_scores64, router_tolerances
from ds4kern.ops.router import reference_router_topk

pytestmark = pytest.mark.gpu

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16}
MODES = {
    "softmax-post": dict(score_function="softmax"),
    "softmax-pre": dict(score_function="softmax", use_pre_softmax=True),
    "sigmoid": dict(score_function="sigmoid"),
    "sigmoid-bias": dict(score_function="sigmoid", bias=True),
    "sqrtsoftplus": dict(score_function="sqrtsoftplus"),
    "sqrtsoftplus-bias": dict(score_function="sqrtsoftplus", bias=True),
}
SHAPES = [(1, 1), (7, 3), (32, 1), (32, 32), (33, 33), (130, 8), (256, 6), (256, 8), (384, 6),
          (1024, 32), (2304, 16), (3072, 5)]


def cuda_variants():
    return [v.name for v in ds4kern.variants("router_topk") if v.backend == "cuda"]


def poisoned(cp, shape, k, index_dtype):
    bad = np.iinfo(index_dtype).max if np.dtype(index_dtype).kind == "u" else -1
    return (cp.full(shape + (k,), cp.nan, cp.float32), cp.full(shape + (k,), bad, index_dtype))


def run_and_check(cp, x_host, k, mode, rng, variant="naive", index_dtype="int32", scaling=None,
                  exact=False, max_tie_rows=None, groups=(0, 0), x_dev=None):
    """Run ``variant`` (None: the dispatcher) on ``x_host`` (or on ``x_dev``, a device array of
    the same values in any layout) into poisoned outputs and compare with the reference."""
    mode = dict(mode)
    E = x_host.shape[-1]
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32) if mode.pop("bias", False) else None
    lead = x_host.shape[:-1]
    w_d, i_d = poisoned(cp, lead, k, np.dtype(index_dtype))
    x_d = cp.asarray(x_host) if x_dev is None else x_dev
    gkw = dict(num_groups=groups[0], group_topk=groups[1]) if groups[0] else {}
    rw, ri = ds4kern.router_topk(x_d, k, expert_bias=None if bias is None else cp.asarray(bias),
                                 scaling_factor=scaling, index_dtype=index_dtype, out=(w_d, i_d),
                                 variant=variant, **mode, **gkw)
    assert rw is w_d and ri is i_d
    w, i = cp.asnumpy(w_d).reshape(-1, k), cp.asnumpy(i_d).reshape(-1, k)
    assert (i >= 0).all() and (i < E).all(), "unwritten or out-of-range index"
    x32 = x_host.astype(np.float32).reshape(-1, E)
    sf, pre = mode["score_function"], mode.get("use_pre_softmax", False)
    w_ref, i_ref = reference_router_topk(x32, k, sf, pre, bias, 1.0 if scaling is None else scaling, *groups)
    if exact:
        np.testing.assert_array_equal(i, i_ref)
    sel = router_scores64(x32, sf, pre, bias)[0]
    if groups[0]:  # compare on the reference's group-limited scores (group choice must match)
        from ds4kern.ops.router.reference import group_limit, score
        # the groups the reference kept, from its own float32 scores (rounded float64 scores can
        # rank near-tied groups the other way)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if sf == "softmax" and pre:
                e = np.exp(x32 - x32.max(1, keepdims=True))
                s32 = (e / e.sum(1, keepdims=True, dtype=np.float32)).astype(np.float32)
            elif sf == "softmax":
                s32 = x32
            else:
                s32 = score(x32, sf) if bias is None else score(x32, sf) + bias
        dropped = np.isneginf(group_limit(s32, k, *groups)) & ~np.isneginf(s32)
        sel = np.where(dropped, -np.inf, sel)
    cmp = compare_router(w, i, w_ref, i_ref, sel, *router_tolerances(E))
    if groups[0] and not cmp.ok and cmp.weight_ok:
        # a row may keep another group where two group scores tie within rounding (the GPU's
        # expf and numpy's exp differ in the last bit); every other row must match
        near = group_tie_rows(i, i_ref, router_scores64(x32, sf, pre, bias)[0], k, *groups)
        rest = sorted(set(cmp.bad_set_rows + cmp.bad_order_rows) - near)
        assert not rest, (cmp, rest)
        assert len(near) <= max(2, x32.shape[0] // 10000), (cmp, sorted(near))
    else:
        assert cmp.ok, cmp
    limit = max(2, x32.shape[0] // 1000) if max_tie_rows is None else max_tie_rows
    assert cmp.tie_rows <= limit, cmp
    assert not np.isnan(w).any()
    return w, i


def assert_same_up_to_ties(w, i, x32, k, sf, bias=None, scaling=1.0, max_tie_rows=4):
    """Indices and weights equal the reference's, except rows where two scores tie within float32
    rounding (the GPU's expf / log1pf and numpy's may order scores 1 ulp apart differently)."""
    w, i = np.asarray(w).reshape(-1, k), np.asarray(i).reshape(-1, k)
    assert ((i >= 0) & (i < x32.shape[-1])).all() and np.isfinite(w).all(), "unwritten or out-of-range output"
    w_ref, i_ref = reference_router_topk(x32, k, sf, False, bias, scaling)
    cmp = compare_router(w, i, w_ref, i_ref,
                         router_scores64(x32, sf, False, bias)[0], *router_tolerances(x32.shape[-1]))
    assert cmp.ok and cmp.tie_rows <= max_tie_rows, cmp


KERNEL_VARIANTS = ["naive", "threshold", "radix", "screened", "rows"]
MAX_K = {"screened": 32, "rows": 16}  # variants with a bound on k (the others: any k)


def skip_unsupported(variant, E, k=1, score_function="sigmoid", **kw):
    """Skip what the registry says ``variant`` cannot run (its own ``supports`` answer)."""
    import cupy

    from conftest import require_support

    require_support("router_topk", variant, cupy.zeros((1, E), cupy.float32), k, score_function=score_function,
                    **kw)


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("E,k", SHAPES, ids=lambda v: str(v))
def test_kernel_equals_reference(cp, rng, variant, dtype, mode, E, k):
    skip_unsupported(variant, E, k, MODES[mode]["score_function"])
    T = int(rng.integers(1, 300))
    x = (rng.standard_normal((T, E)) * 2).astype(DTYPES[dtype])
    run_and_check(cp, x, k, MODES[mode], rng, variant=variant, scaling=float(rng.choice([1.0, 1.5, 2.5])))


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["softmax-post", "softmax-pre", "sigmoid", "sqrtsoftplus"])
def test_ties_identical_to_reference(cp, rng, variant, dtype, mode):
    skip_unsupported(variant, 96, 12, MODES[mode]["score_function"])
    # integer logits: exact ties everywhere; selection and order must be identical
    x = rng.integers(-3, 4, size=(500, 96)).astype(DTYPES[dtype])
    run_and_check(cp, x, 12, MODES[mode], rng, variant=variant, exact=True)
    x = np.full((8, 64), 0.5, np.float32).astype(DTYPES[dtype])
    kmax = MAX_K.get(variant, 64)
    run_and_check(cp, x, kmax, MODES[mode], rng, variant=variant, exact=True)


@pytest.mark.parametrize("variant", ["threshold", "screened", "rows"])
@pytest.mark.parametrize("mode", ["sqrtsoftplus", "sqrtsoftplus-bias", "sigmoid", "sigmoid-bias", "softmax-pre"])
def test_screening_hard_cases(cp, rng, mode, variant):
    skip_unsupported(variant, 256, 1, MODES[mode]["score_function"])
    kmax = MAX_K.get(variant, 64)
    """Rows where the screening is hardest: tiny sqrtsoftplus scores (largest approximation
    error), near-ties, many exact ties (fallback), k > 32 (fallback), wide ranges."""
    E = 256
    cases = [
        rng.uniform(-14, -8, (400, E)),                      # all scores tiny
        rng.uniform(-3, 3, (400, E)).round(2),               # dense near-ties
        np.repeat(rng.standard_normal((400, 1)), E, 1),      # one value per row: all tied
        rng.standard_normal((400, E)) * 30,                  # past the x > 20 switch
        np.where(rng.random((400, E)) < 0.1, 25.0, -25.0),   # two clusters
        rng.standard_normal((400, E)) * 4,                   # wide logits (top scores from x ~ 10)
        rng.standard_normal((400, E)) * 0.4,                 # narrow logits: small score gaps
    ]
    for x in cases:
        for k in (1, 6, 8, 16, 31, 32, 40):
            if k > kmax:
                continue
            # near-tie rows are legitimate here (compare_router checks they tie within rounding)
            for dt in (np.float32, BFLOAT16):
                run_and_check(cp, x.astype(dt), k, MODES[mode], rng, variant=variant, max_tie_rows=400)


@pytest.mark.parametrize("variant", ["threshold", "screened", "rows"])
def test_screening_nan_and_inf_rows_match_reference(cp, rng, variant):
    x = rng.standard_normal((64, 96)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[0] = np.nan
    x[1, :90] = np.nan
    x[2, 3] = np.inf
    x[3, 10:20] = -np.inf
    x[4] = -np.inf
    kmax = MAX_K.get(variant, 64)
    for sf in ("sigmoid", "sqrtsoftplus") + (() if variant == "rows" else ("softmax",)):
        for k in (1, 4, 8, 16, 32, 40):
            if k > kmax:
                continue
            _, i = ds4kern.router_topk(cp.asarray(x), k, score_function=sf, variant=variant)
            _, i_ref = ds4kern.router_topk(x, k, score_function=sf)
            np.testing.assert_array_equal(cp.asnumpy(i), i_ref, err_msg=f"{sf} k={k}")


@pytest.mark.parametrize("sf,abs_,rel", [("sigmoid", 2e-7, 1e-6), ("sqrtsoftplus", 5e-4, 5e-4)])
def test_warp_screening_error_bounds(cp, sf, abs_, rel):
    """The screened kernel's approximations stay within a third of the bounds it assumes
    (DS4_SIG_* / DS4_SSP_* in router_common.cuh), and its precise scores match float64 formulas."""
    from ds4kern.ops.router.kernels import PROBES, SCREEN_PROBES

    xs = np.concatenate([np.linspace(-120, 120, 2_000_001), np.random.default_rng().standard_normal(1_000_000) * 10])
    x = cp.asarray(xs.astype(np.float32))
    a, e = cp.empty_like(x), cp.empty_like(x)
    PROBES.kernel(SCREEN_PROBES[sf])(((x.size + 255) // 256,), (256,), (x, a, e, np.int64(x.size)))
    worst = float(cp.max(cp.abs(a - e) / (abs_ + rel * cp.abs(e))))
    assert worst <= 1 / 3, f"{sf}: approximation error reaches {worst:.3f} of the bound"
    x64 = xs.astype(np.float32).astype(np.float64)
    ref = 1 / (1 + np.exp(-x64)) if sf == "sigmoid" else np.sqrt(np.logaddexp(0.0, x64))
    normal = np.abs(x64) < 87  # e^x a normal float32
    np.testing.assert_allclose(cp.asnumpy(e)[normal], ref[normal], rtol=4e-7, atol=1e-30)


def test_sqrtsoftplus_screening_error_bound(cp):
    """The screening approximation stays within a third of the bound the threshold kernel
    assumes (DS4_SSP_ABS + DS4_SSP_REL * |s| = 5e-4 + 5e-4 |s|), tiny scores included."""
    from ds4kern.ops.router.kernels import PROBES, SSP_PROBE

    xs = np.concatenate([np.linspace(-100, 40, 2_000_001), np.random.default_rng().standard_normal(1_000_000) * 10])
    x = cp.asarray(xs.astype(np.float32))
    a, e = cp.empty_like(x), cp.empty_like(x)
    PROBES.kernel(SSP_PROBE)(((x.size + 255) // 256,), (256,), (x, a, e, np.int64(x.size)))
    err = cp.abs(a - e)
    bound = 5e-4 + 5e-4 * cp.abs(e)
    worst = float(cp.max(err / bound))
    assert worst <= 1 / 3, f"approximation error reaches {worst:.3f} of the bound"
    # and the precise score matches the float64 formula while e^x is a normal float32
    # (below x = -87 the GPU may flush the denormal e^x to zero; numpy keeps it)
    normal = xs.astype(np.float32) > -87
    ref = np.sqrt(np.logaddexp(0.0, xs.astype(np.float32).astype(np.float64)))
    np.testing.assert_allclose(cp.asnumpy(e)[normal], ref[normal], rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
@pytest.mark.parametrize("index_dtype", ["uint8", "uint16", "int16", "int32", "int64"])
def test_index_dtypes_and_leading_dims(cp, rng, variant, index_dtype):
    E = 136 if variant == "rows" else 130  # rows: E a multiple of 8
    x = rng.standard_normal((3, 5, 7, E)).astype(np.float32)
    run_and_check(cp, x, 9, MODES["sqrtsoftplus-bias"], rng, variant=variant, index_dtype=index_dtype)
    x = rng.standard_normal((301, E)).astype(np.float32)
    k = MAX_K.get(variant, 40)  # k > 32 where supported
    run_and_check(cp, x, k, MODES["sigmoid-bias"], rng, variant=variant, index_dtype=index_dtype)


@pytest.mark.parametrize("variant", ["naive", "threshold", "radix", "screened", "rows", "cupy_composite"])
def test_strided_narrow_index_output(cp, rng, variant):
    if variant not in cuda_variants():
        pytest.skip(f"{variant} not installed")
    T, L, E, k = 777, 4, 256, 6
    buf = cp.full((T + 3, L, k), 255, cp.uint8)
    wbuf = cp.full((T, 2, k), cp.nan, cp.float32)
    for layer in range(L):
        x = rng.standard_normal((T, E)).astype(np.float32)
        w, i = ds4kern.router_topk(cp.asarray(x), k, score_function="sqrtsoftplus",
                                   out=(wbuf[:, 1, :], buf[1:1 + T, layer, :]), variant=variant)
        assert_same_up_to_ties(cp.asnumpy(wbuf[:, 1, :]), cp.asnumpy(buf[1:1 + T, layer, :]).astype(np.int64), x, k,
                               "sqrtsoftplus")
    assert bool((buf[0] == 255).all()) and bool((buf[1 + T:] == 255).all())
    assert bool(cp.isnan(wbuf[:, 0, :]).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_tiles_and_fallbacks(cp, rng, dtype):
    """rows: partial last tiles, logits not 16-byte aligned (rows refuses them: they go to another
    variant, and explain says so), rows whose screen fails (ties past the candidate list, NaN and
    infinite rows) mixed with normal rows in one tile, a large bias range, E = 8 (one chunk)."""
    for T in (1, 31, 33, 95, 1000):
        x = rng.standard_normal((T, 256)).astype(DTYPES[dtype])
        run_and_check(cp, x, 6, MODES["sqrtsoftplus-bias"], rng, variant="rows")
    E = 256
    flat = cp.asarray(rng.standard_normal(20000 * E + 1).astype(DTYPES[dtype]))
    x_d = flat[1:].reshape(20000, E)
    assert x_d.data.ptr % 16
    with pytest.raises(ValueError, match="16-byte"):
        ds4kern.router_topk(x_d, 6, score_function="sigmoid", variant="rows")
    d = ds4kern.explain("router_topk", x_d, 6, score_function="sigmoid")
    assert d.chosen.name != "rows" and "16-byte" in str(d)
    w, i = ds4kern.router_topk(x_d, 6, score_function="sigmoid")
    _, i_ref = reference_router_topk(cp.asnumpy(x_d).astype(np.float32), 6, "sigmoid", False, None, 1.0)
    np.testing.assert_array_equal(cp.asnumpy(i), i_ref)
    x = rng.standard_normal((64, E)).astype(np.float32)
    x[0] = 0.25                      # all tied: more candidates than the list holds
    x[1, ::2] = np.nan               # NaN chunks mixed in
    x[2] = np.nan                    # all NaN
    x[3, 7] = np.inf
    x[4, :200] = -np.inf
    x[5, 10:20] = 1.0                # ten exact ties at the top
    for sf in ("sigmoid", "sqrtsoftplus"):
        for k in (1, 6, 8, 16):
            for bias in (None, (rng.standard_normal(E) * 50).astype(np.float32)):
                _, i = ds4kern.router_topk(cp.asarray(x.astype(DTYPES[dtype])), k, score_function=sf, variant="rows",
                                           expert_bias=None if bias is None else cp.asarray(bias))
                _, i_ref = ds4kern.router_topk(x.astype(DTYPES[dtype]), k, score_function=sf, expert_bias=bias)
                np.testing.assert_array_equal(cp.asnumpy(i), i_ref, err_msg=f"{sf} k={k} bias={bias is not None}")
    x = rng.standard_normal((300, 8)).astype(DTYPES[dtype])
    run_and_check(cp, x, 3, MODES["sigmoid-bias"], rng, variant="rows")


def test_default_allocation_is_fully_written(cp, rng):
    # fill the pool's free blocks of the output sizes with poison, then allocate through the op
    T, E, k = 1000, 256, 6
    for _ in range(3):
        junk = [cp.full((T, k), cp.nan, cp.float32), cp.full((T, k), -1, cp.int32)]
        del junk
        x = rng.standard_normal((T, E)).astype(np.float32)
        w, i = ds4kern.router_topk(cp.asarray(x), k, score_function="sigmoid")
        assert_same_up_to_ties(cp.asnumpy(w), cp.asnumpy(i), x, k, "sigmoid")  # (poison fails this)


def test_empty_and_single(cp, rng):
    w, i = ds4kern.router_topk(cp.zeros((0, 256), cp.float32), 6)
    assert w.shape == (0, 6) and i.shape == (0, 6) and isinstance(w, cp.ndarray)
    w, i = ds4kern.router_topk(cp.zeros((4, 0, 256), cp.float32), 6)
    assert w.shape == (4, 0, 6)
    x = rng.standard_normal(256).astype(np.float32)
    w, i = ds4kern.router_topk(cp.asarray(x), 6)
    assert w.shape == (6,)
    assert list(cp.asnumpy(i)) == list(np.argsort(-x, kind="stable")[:6])


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_largest_spec_shape(cp, rng, variant, dtype):
    x = rng.standard_normal((65536, 256)).astype(DTYPES[dtype])
    run_and_check(cp, x, 6, MODES["sqrtsoftplus-bias"], rng, variant=variant, scaling=1.5)
    run_and_check(cp, x, 8, MODES["sigmoid-bias"], rng, variant=variant, scaling=2.5)


def test_nan_rule_matches_reference(cp, rng):
    x = rng.standard_normal((64, 40)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[0, :] = np.nan
    x[1, :38] = np.nan
    x[2, 5] = -np.inf
    for sf in ("sigmoid", "sqrtsoftplus", "softmax"):
        for k in (1, 4, 40):
            _, i = ds4kern.router_topk(cp.asarray(x), k, score_function=sf)
            _, i_ref = ds4kern.router_topk(x, k, score_function=sf)
            np.testing.assert_array_equal(cp.asnumpy(i), i_ref, err_msg=f"{sf} k={k}")


def test_non_default_stream(cp, rng):
    x = rng.standard_normal((4096, 256)).astype(np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        x_d = cp.asarray(x)
        w, i = ds4kern.router_topk(x_d, 6, score_function="sigmoid")
    s.synchronize()
    w_ref, i_ref = reference_router_topk(x, 6, "sigmoid", False, None, 1.0)
    # tie-aware: the GPU's expf and numpy's exp may order two scores 1 ulp apart differently
    cmp = compare_router(cp.asnumpy(w), cp.asnumpy(i), w_ref, i_ref, router_scores64(x, "sigmoid", False, None)[0],
                         *router_tolerances(256))
    assert cmp.ok and cmp.tie_rows <= 4, cmp


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_cuda_graph_capture(cp, rng, variant):
    T, E, k = 2048, 256, 6
    bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
    kw = dict(score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5, variant=variant)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        x_d = cp.asarray(rng.standard_normal((T, E)).astype(np.float32))
        w_d, i_d = cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)
        ds4kern.router_topk(x_d, k, out=(w_d, i_d), **kw)  # compile outside the capture
        s.begin_capture()
        ds4kern.router_topk(x_d, k, out=(w_d, i_d), **kw)
        g = s.end_capture()
        for _ in range(2):
            x = rng.standard_normal((T, E)).astype(np.float32)
            x_d[...] = cp.asarray(x)
            w_d.fill(cp.nan)
            i_d.fill(-1)
            g.launch(s)
            s.synchronize()
            b = cp.asnumpy(bias)
            w_ref, i_ref = reference_router_topk(x, k, "sqrtsoftplus", False, b, 1.5)
            cmp = compare_router(cp.asnumpy(w_d), cp.asnumpy(i_d), w_ref, i_ref,
                                 router_scores64(x, "sqrtsoftplus", False, b)[0], *router_tolerances(E))
            assert cmp.ok and cmp.tie_rows <= 2, cmp  # tie-aware (GPU and numpy exp differ in the last bit)


def test_torch_zero_copy(cp, rng):
    torch = pytest.importorskip("torch")
    from ds4kern.core.arrays import Frame

    t = torch.randn(333, 256, device="cuda", dtype=torch.bfloat16)
    f = Frame(t, "logits")
    assert f.array.data.ptr == t.data_ptr(), "torch tensor was copied"
    bias = torch.randn(256, device="cuda", dtype=torch.float32) * 0.1
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        w, i = ds4kern.router_topk(t, 6, score_function="sqrtsoftplus", expert_bias=bias, index_dtype="int64")
    s.synchronize()
    assert isinstance(w, torch.Tensor) and w.is_cuda and w.dtype == torch.float32 and i.dtype == torch.int64
    x = t.float().cpu().numpy()
    assert_same_up_to_ties(w.cpu().numpy(), i.cpu().numpy(), x, 6, "sqrtsoftplus", bias=bias.cpu().numpy())


def test_explain_on_gpu_arrays(cp):
    x = cp.ones((4096, 256), cp.float32)
    d = ds4kern.explain("router_topk", x, 6, score_function="sigmoid")
    assert d.chosen.name == "screened", str(d)
    d = ds4kern.explain("router_topk", x[:128], 6, score_function="sigmoid")
    assert d.chosen.name == "screened", str(d)
    d = ds4kern.explain("router_topk", cp.ones((4096, 1024), cp.float32), 6, score_function="sigmoid")
    assert d.chosen.name == "threshold" and "exceeds 512" in str(d), str(d)
    d = ds4kern.explain("router_topk", cp.ones((8192, 2304), cp.float32), 6)
    assert d.chosen.name == "naive" and "exceeds 1024" in str(d), str(d)
    assert "reference" in str(d) and "backend 'numpy'" in str(d)
    d = ds4kern.explain("router_topk", cp.ones((2, 4000), cp.float32), 6)
    assert any(c.variant.name == "naive" and "exceeds" in c.rejected for c in d.candidates if c.rejected)
    assert d.chosen.name == "radix", str(d)  # the only kernel for E > 3072
    with pytest.raises(ValueError, match="exceeds"):
        ds4kern.router_topk(cp.ones((2, 4000), cp.float32), 6, variant="naive")


@pytest.mark.parametrize("E,k", [(4000, 6), (5000, 37), (8000, 64), (3333, 3333 // 8)])
@pytest.mark.parametrize("mode", ["softmax-pre", "sigmoid-bias", "sqrtsoftplus"])
def test_radix_beyond_register_limits(cp, rng, E, k, mode):
    x = (rng.standard_normal((int(rng.integers(1, 200)), E)) * 2).astype(np.float32)
    run_and_check(cp, x, k, MODES[mode], rng, variant="radix")
    x = rng.integers(-3, 4, size=(64, E)).astype(np.float32)  # ties everywhere: identical to the reference
    plain = {key: v for key, v in MODES[mode].items() if key != "bias"}
    run_and_check(cp, x, k, plain, rng, variant="radix", exact=True)
    if MODES[mode].get("bias"):
        # with a random bias two experts' s + b can fall within one ulp of each other, where the
        # GPU's and numpy's sigmoid (1 ulp apart) round the sums apart: compared tie-aware
        run_and_check(cp, x, k, MODES[mode], rng, variant="radix", max_tie_rows=64)


def test_host_bias_with_device_logits_is_refused(cp):
    with pytest.raises(TypeError, match="expert_bias"):
        ds4kern.router_topk(cp.ones((4, 16), cp.float32), 2, score_function="sigmoid",
                            expert_bias=np.zeros(16, np.float32))


@pytest.mark.parametrize("variant", ["cupy_composite"])
@pytest.mark.parametrize("mode", ["softmax-post", "softmax-pre", "sigmoid-bias", "sqrtsoftplus-bias"])
def test_plugin_variant_equals_reference(cp, rng, variant, mode):
    if variant not in cuda_variants():
        pytest.skip(f"plugin variant {variant} not installed (pip install -e plugins/ds4kern-cupy-router)")
    x = rng.standard_normal((517, 130)).astype(np.float32)
    run_and_check(cp, x, 7, MODES[mode], rng, variant=variant)


GROUP_CASES = [(256, 8, 8, 4), (32, 4, 8, 4), (128, 16, 8, 4), (1024, 32, 8, 4), (130, 6, 13, 3), (64, 8, 8, 8),
               (160, 8, 5, 4), (256, 8, 8, 8), (96, 6, 3, 3), (256, 4, 2, 2)]


GROUP_VARIANTS = ["naive", "grouped", "rows"]


def skip_unsupported_groups(variant, E, G, k=8, gt=4, mode="sigmoid"):
    m = {key: v for key, v in MODES[mode].items() if key != "bias"}
    skip_unsupported(variant, E, k, num_groups=G, group_topk=gt, **m)


@pytest.mark.parametrize("variant", GROUP_VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("E,k,G,gt", GROUP_CASES, ids=lambda v: str(v))
def test_group_limited_equals_reference(cp, rng, dtype, mode, E, k, G, gt, variant):
    skip_unsupported_groups(variant, E, G, k, gt, mode)
    T = int(rng.integers(1, 400))
    x = (rng.standard_normal((T, E)) * 2).astype(DTYPES[dtype])
    run_and_check(cp, x, k, MODES[mode], rng, scaling=2.5, groups=(G, gt), variant=variant)


@pytest.mark.parametrize("variant", GROUP_VARIANTS)
@pytest.mark.parametrize("G,gt", [(2, 1), (4, 2), (16, 4), (32, 8), (32, 32), (8, 8), (4, 4)])
@pytest.mark.parametrize("mode", ["sigmoid-bias", "softmax-pre", "sqrtsoftplus"])
def test_group_shapes_on_256_experts(cp, rng, variant, G, gt, mode):
    # groups of 128 ... 8 experts: 16 ... 1 lanes per group in the grouped kernel
    k = 32 if gt == 32 else 8
    skip_unsupported_groups(variant, 256, G, k, gt, mode)
    x = rng.standard_normal((777, 256)).astype(np.float32)
    run_and_check(cp, x, k, MODES[mode], rng, scaling=1.5, groups=(G, gt), variant=variant)


@pytest.mark.parametrize("variant", GROUP_VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_group_limited_v3_style_large_and_ties(cp, rng, dtype, variant):
    # DeepSeek-V3 style: E=256, k=8, sigmoid + bias, 8 groups, top 4 groups, scaling 2.5
    x = rng.standard_normal((65536, 256)).astype(DTYPES[dtype])
    run_and_check(cp, x, 8, MODES["sigmoid-bias"], rng, scaling=2.5, groups=(8, 4), variant=variant)
    x = rng.integers(-2, 3, size=(3000, 256)).astype(DTYPES[dtype])  # ties in scores and in group scores
    run_and_check(cp, x, 8, MODES["sigmoid"], rng, exact=True, groups=(8, 4), variant=variant)
    x[::7] = np.nan  # NaN rows and group sums
    x[1::7, :40] = np.nan
    _, i = ds4kern.router_topk(cp.asarray(x), 8, score_function="sigmoid", num_groups=8, group_topk=4,
                               variant=variant)
    _, i_ref = ds4kern.router_topk(x.astype(np.float32), 8, score_function="sigmoid", num_groups=8, group_topk=4)
    np.testing.assert_array_equal(cp.asnumpy(i), i_ref)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["sigmoid-bias", "sqrtsoftplus", "softmax-post"])
@pytest.mark.parametrize("E,k,G,gt", [(256, 8, 8, 4), (128, 16, 8, 4), (32, 4, 8, 4), (64, 8, 8, 8),
                                      (256, 32, 32, 32), (512, 8, 8, 4)], ids=lambda v: str(v))
def test_grouped_direct_path_at_every_size(cp, rng, monkeypatch, dtype, mode, E, k, G, gt):
    # the small-T path (exact keys, no screen; sorted per-lane lists for sigmoid / sqrtsoftplus
    # up to 8 experts per lane) forced on thousands of rows, with ties and NaN rows
    from ds4kern.ops.router import kernels as rkernels
    monkeypatch.setattr(rkernels, "WARP_DIRECT_MAX_TOKENS", 1 << 40)
    x = (rng.standard_normal((5003, E)) * 2).astype(DTYPES[dtype])
    run_and_check(cp, x, k, MODES[mode], rng, scaling=2.5, groups=(G, gt), variant="grouped")
    sf = MODES[mode]["score_function"]
    x = rng.integers(-2, 3, size=(3001, E)).astype(DTYPES[dtype])  # ties in scores and in group scores
    run_and_check(cp, x, k, dict(score_function=sf), rng, exact=True, groups=(G, gt), variant="grouped")
    x[::7] = np.nan
    x[1::7, :E // 5] = np.nan
    w, i = ds4kern.router_topk(cp.asarray(x), k, score_function=sf, num_groups=G, group_topk=gt, variant="grouped")
    _, i_ref = ds4kern.router_topk(x.astype(np.float32), k, score_function=sf, num_groups=G, group_topk=gt)
    np.testing.assert_array_equal(cp.asnumpy(i), i_ref)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sf", ["sigmoid", "sqrtsoftplus"])
def test_rows_grouped_screen_fallbacks(cp, rng, dtype, sf):
    """rows' grouped form: rows where the screened group choice is not certain (group sums tied
    exactly or 1 ulp apart: the exact path), NaN-heavy rows where experts of dropped groups (-inf)
    win over NaN scores, infinite logits and bias, mixed with normal rows in each tile; partial
    tiles; group sizes 16 ... 128."""
    E, k, G, gt = 256, 8, 8, 4
    gs = E // G
    for T in (1, 15, 17, 1000):
        x = rng.standard_normal((T, E)).astype(DTYPES[dtype])
        run_and_check(cp, x, k, MODES[f"{sf}-bias"], rng, scaling=2.5, groups=(G, gt), variant="rows")
    x = rng.standard_normal((96, E)).astype(np.float32)
    for r in range(0, 96, 3):  # group 5 = a copy of group 2 (tied sums), then 1 ulp up (rows r + 1)
        x[r, 5 * gs:6 * gs] = x[r, 2 * gs:3 * gs]
        x[r + 1, 5 * gs:6 * gs] = x[r + 1, 2 * gs:3 * gs]
        j = 5 * gs + int(np.argmax(x[r + 1, 5 * gs:6 * gs]))
        x[r + 1, j] = np.nextafter(x[r + 1, j], np.float32(np.inf))
    x[2, :] = np.nan
    x[2, 7 * gs:7 * gs + 3] = (1.0, 2.0, 3.0)  # one group with three numbers: dropped experts fill the list
    x[5, :] = np.nan
    x[5, ::37] = 0.5                           # a number here and there
    x[8, 40] = np.inf
    x[11, 3 * gs:4 * gs] = -np.inf
    x[14, ::2] = np.nan
    x = x.astype(DTYPES[dtype])
    for bias in (None, (rng.standard_normal(E) * 0.2).astype(np.float32), np.where(np.arange(E) == 77, np.inf, 0.1)
                 .astype(np.float32)):
        for kk, gg in ((8, 4), (4, 4), (6, 3)):
            _, i = ds4kern.router_topk(cp.asarray(x), kk, score_function=sf, num_groups=G, group_topk=gg,
                                       expert_bias=None if bias is None else cp.asarray(bias), variant="rows")
            _, i_ref = ds4kern.router_topk(x.astype(np.float32), kk, score_function=sf, num_groups=G, group_topk=gg,
                                           expert_bias=bias)
            # (rows r + 1: the 1-ulp copy may order its two experts either way after rounding)
            exact_rows = np.arange(96) % 3 != 1
            np.testing.assert_array_equal(cp.asnumpy(i)[exact_rows], i_ref[exact_rows],
                                          err_msg=f"k={kk} gt={gg} bias={bias is not None}")
        run_and_check(cp, x[1::3], 8, dict(score_function=sf), rng, groups=(G, 4), variant="rows",
                      max_tie_rows=32)
    for G2, k2, gt2 in ((16, 8, 4), (2, 4, 2), (4, 8, 4)):
        x = rng.integers(-2, 3, size=(500, E)).astype(DTYPES[dtype])  # ties everywhere
        run_and_check(cp, x, k2, dict(score_function=sf), rng, exact=True, groups=(G2, gt2), variant="rows")


def test_group_limited_dispatch(cp):
    x = cp.ones((8192, 256), cp.float32)
    d = ds4kern.explain("router_topk", x, 8, score_function="sigmoid", num_groups=8, group_topk=4)
    assert d.chosen.name == "grouped", str(d)
    assert "group-limited routing is not implemented" in str(d)  # radix, threshold
    d = ds4kern.explain("router_topk", cp.ones((64, 130), cp.float32), 6, score_function="sigmoid",
                        num_groups=13, group_topk=3)
    assert d.chosen.name == "naive" and "power-of-two number of lanes" in str(d), str(d)
