"""Hyper-connections' CUDA variants against the float64 reference, on fresh random inputs.

Every CUDA variant the registry says supports a problem runs, with each of its settings
(``Variant.configs``: grouped's ``tokens_per_block``); outputs are poisoned (NaN) first, so an
unwritten element fails.  Tolerances against the float64 reference: bf16 X_new within one bf16
rounding step (relative 2^-7) plus 1e-5 absolute; x_in the same plus what the pre weights'
tolerance carries through its sum (``check_x_in``); float32 X_new within 1e-5; post and comb within 1e-4 relative, 1e-5 absolute (float32
dot products of up to 28672 terms, 20 Sinkhorn iterations with reciprocals).
"""

import numpy as np
import pytest
from conftest import require_support, supported_variants
from hc_cases import DTYPES, make_inputs

import ds4kern
import ds4kern.ops.hyper_connections  # noqa: F401  (registers the ops before ds4kern imports them)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.ops.hyper_connections import hc_post, hc_post_pre, hc_pre, reference_hc_post, reference_hc_pre
from ds4kern.ops.hyper_connections import kernels as K

pytestmark = pytest.mark.gpu

SIZES = [(B, D) for B in (1, 3, 64, 1024) for D in (4096, 7168)]
MIX_TOL = dict(rtol=1e-4, atol=1e-5)
OPS = {"hc_pre": hc_pre, "hc_post": hc_post, "hc_post_pre": hc_post_pre}


def check_x_in(got, want, X, label):
    """x_in = sum_h pre[h] X[h] against the reference: one bf16 rounding (rtol 2^-7) plus what the
    pre weights' own tolerance (MIX_TOL) carries through the sum, sum_h (rtol + atol) |X[h]| with
    pre <= 1.  Where the four terms cancel, that absolute part is what a float32 4D-long dot chain
    leaves (seen: B=4097 in one slice, |x_in| ~ 1e-5 off by 1.3e-5 at |X| ~ 1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (label, got.shape, want.shape)
    carried = (MIX_TOL["rtol"] + MIX_TOL["atol"]) * np.abs(np.asarray(X, np.float64)).sum(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities pass through got == want
        close = np.abs(got - want) <= 2.0 ** -7 * np.abs(want) + 1e-5 + carried
    bad = ~(close | (got == want) | (np.isnan(got) & np.isnan(want)))
    assert not bad.any(), (f"{label}: {int(bad.sum())} of {bad.size} elements off, first at "
                           f"{np.argwhere(bad)[0].tolist()}: got {got[bad][0]}, want {want[bad][0]}")


def check_new(got, want, dtype, label):
    tol = dict(rtol=2.0 ** -7, atol=1e-5) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), err_msg=label,
                               equal_nan=True, **tol)


def check_mix(got, want, X, label):
    """hc_pre's outputs (x_in, post, comb) against the reference; ``X``: the streams x_in was mixed
    from (host, [B, 4, D]; for hc_post_pre its X_new as stored)."""
    for g, w, n in zip(got, want, ("x_in", "post", "comb")):
        if n == "x_in":
            check_x_in(g, w, X, f"{label}: x_in")
        else:
            np.testing.assert_allclose(g, w, err_msg=f"{label}: {n}", equal_nan=True, **MIX_TOL)


def pre_of_stored(X_new, inp):
    """hc_post_pre's mix outputs are hc_pre of X_new *as stored*: the reference of them is taken on
    the kernel's own X_new (a bf16 X_new may differ from the float64 reference's by one rounding
    step, which the dot products would otherwise amplify)."""
    return reference_hc_pre(X_new, inp["hc_fn"], inp["hc_scale"], inp["hc_base"])


def device(cp, inp, scale_on_device=False):
    d = {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in inp.items()}
    if scale_on_device:
        d["hc_scale"] = cp.asarray(np.asarray(inp["hc_scale"], np.float32))
    return d


def poisoned(cp, shape, dtype):
    return cp.full(shape, np.nan, np.float32).astype(dtype)


def settings(op, *args, **kw):
    """(variant, config) pairs the registry offers for this call."""
    d = ds4kern.explain(op, *args, **kw)
    out = []
    for name in supported_variants(op, *args, **kw):
        cfgs = registry.get(op, name).configs_for(d.problem)
        out += [(name, c) for c in cfgs] if cfgs else [(name, None)]
    return out


def run(op, variant, config, *args, **kw):
    """One call of ``variant`` with ``config`` bound, after the op's own validation."""
    import cupy as cp

    call = OPS[op].op.prepare(*args, **kw)
    with call.frame.running():
        registry.get(op, variant).fn(call.args, **(config or {}))
    cp.cuda.get_current_stream().synchronize()


def pre_outs(cp, B, D):
    return (poisoned(cp, (B, D), BFLOAT16), poisoned(cp, (B, 4), np.float32), poisoned(cp, (B, 4, 4), np.float32))


def host(arrs):
    import cupy as cp

    return tuple(cp.asnumpy(a) for a in arrs)


# -- every variant, every size ----------------------------------------------------------------


@pytest.mark.parametrize("slices", [None, 1, 3])
@pytest.mark.parametrize("B", [300, 4097])
def test_tiled_partial_tiles_and_forced_slices(cp, rng, monkeypatch, B, slices):
    """tiled with a partial last token tile, and with the 4D reduction in 1 slice (one sequential
    chain per token, what B >= 67k tokens gets) or 3 uneven slices, against the reference."""
    D = 4096
    if slices is not None:
        monkeypatch.setattr(K, "tiled_slices", lambda *a: slices)
    inp = make_inputs(rng, B, D, "bfloat16")
    want = reference_hc_pre(inp["X"], inp["hc_fn"], inp["hc_scale"], inp["hc_base"])
    dv = device(cp, inp)
    args = (dv["X"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    require_support("hc_pre", "tiled", *args)
    outs = pre_outs(cp, B, D)
    run("hc_pre", "tiled", None, *args, out=outs)
    check_mix(host(outs), want, inp["X"], f"hc_pre tiled B={B} slices={slices}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
def test_hc_pre_variants_match_reference(cp, rng, B, D, dtype):
    inp = make_inputs(rng, B, D, dtype)
    want = reference_hc_pre(inp["X"], inp["hc_fn"], inp["hc_scale"], inp["hc_base"])
    dv = device(cp, inp)
    args = (dv["X"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    pairs = settings("hc_pre", *args)
    assert {"naive", "split"} <= {v for v, _ in pairs}
    for variant, config in pairs:
        outs = pre_outs(cp, B, D)
        run("hc_pre", variant, config, *args, out=outs)
        check_mix(host(outs), want, inp["X"], f"hc_pre {variant} {config}")


@pytest.mark.parametrize("dtype,y_dtype", [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"),
                                           ("bfloat16", "float32")])
@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
def test_hc_post_matches_reference(cp, rng, B, D, dtype, y_dtype):
    inp = make_inputs(rng, B, D, dtype, y_dtype)
    want = reference_hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    dv = device(cp, inp)
    args = (dv["y"], dv["X"], dv["post"], dv["comb"])
    for variant, config in settings("hc_post", *args):
        out = poisoned(cp, (B, 4, D), DTYPES[dtype])
        run("hc_post", variant, config, *args, out=out)
        check_new(cp.asnumpy(out), want, dtype, f"hc_post {variant}")


@pytest.mark.parametrize("dtype,y_dtype", [("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("B,D", SIZES, ids=[f"B{b}-D{d}" for b, d in SIZES])
def test_hc_post_pre_variants_match_reference(cp, rng, B, D, dtype, y_dtype):
    inp = make_inputs(rng, B, D, dtype, y_dtype)
    new = reference_hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    dv = device(cp, inp)
    args = (dv["y"], dv["X"], dv["post"], dv["comb"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    pairs = settings("hc_post_pre", *args)
    assert {"naive", "split"} <= {v for v, _ in pairs}
    for variant, config in pairs:
        outs = (poisoned(cp, (B, 4, D), DTYPES[dtype]),) + pre_outs(cp, B, D)
        run("hc_post_pre", variant, config, *args, out=outs)
        got = host(outs)
        check_new(got[0], new, dtype, f"hc_post_pre {variant} {config}: X_new")
        check_mix(got[1:], pre_of_stored(got[0], inp), got[0], f"hc_post_pre {variant} {config}")


# -- layouts, in place, device hc_scale -------------------------------------------------------


def device_streams(cp, X, layout):
    """X on the device: contiguous, padded (token / stream strides wider than dense, aligned),
    offset (one element into a buffer: misaligned, so the scalar kernels), or transposed
    (stream-major memory, token stride D)."""
    B, _, D = X.shape
    if layout == "padded":
        wide = cp.full((B, 5, D + 8), np.nan, np.float32).astype(X.dtype)
        wide[:, 1:, 8:] = cp.asarray(X)
        return wide[:, 1:, 8:]
    if layout == "offset":
        flat = cp.full(X.size + 2, np.nan, np.float32).astype(X.dtype)
        flat[1:X.size + 1] = cp.asarray(X.reshape(-1))
        return flat[1:X.size + 1].reshape(X.shape)
    if layout == "transposed":
        return cp.asarray(np.ascontiguousarray(X.transpose(1, 0, 2))).transpose(1, 0, 2)
    return cp.asarray(X)


@pytest.mark.parametrize("layout", ["padded", "offset", "transposed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layouts_every_variant(cp, rng, layout, dtype):
    B, D = 37, 4096
    inp = make_inputs(rng, B, D, dtype)
    Xd = device_streams(cp, inp["X"], layout)
    dv = device(cp, inp, scale_on_device=True)
    want = reference_hc_pre(inp["X"], inp["hc_fn"], inp["hc_scale"], inp["hc_base"])
    vec = ds4kern.explain("hc_pre", Xd, dv["hc_fn"], dv["hc_scale"], dv["hc_base"]).problem.vec
    assert vec == (1 if layout == "offset" else 4)
    for variant, config in settings("hc_pre", Xd, dv["hc_fn"], dv["hc_scale"], dv["hc_base"]):
        outs = pre_outs(cp, B, D)
        run("hc_pre", variant, config, Xd, dv["hc_fn"], dv["hc_scale"], dv["hc_base"], out=outs)
        check_mix(host(outs), want, inp["X"], f"{layout} {variant} {config}")
    new = reference_hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    args = (dv["y"], Xd, dv["post"], dv["comb"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    for variant, config in settings("hc_post_pre", *args):
        outs = (poisoned(cp, (B, 4, D), DTYPES[dtype]),) + pre_outs(cp, B, D)
        run("hc_post_pre", variant, config, *args, out=outs)
        got = host(outs)
        check_new(got[0], new, dtype, f"{layout} {variant}: X_new")
        check_mix(got[1:], pre_of_stored(got[0], inp), got[0], f"{layout} {variant} {config}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place(cp, rng, dtype):
    B, D = 64, 7168
    inp = make_inputs(rng, B, D, dtype)
    dv = device(cp, inp)
    new = reference_hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
    X = cp.asarray(inp["X"])
    assert hc_post(dv["y"], X, dv["post"], dv["comb"], out=X) is X
    check_new(cp.asnumpy(X), new, dtype, "hc_post in place")
    mix = (dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    for variant, config in settings("hc_post_pre", dv["y"], dv["X"], dv["post"], dv["comb"], *mix):
        X = cp.asarray(inp["X"])
        outs = (X,) + pre_outs(cp, B, D)
        run("hc_post_pre", variant, config, dv["y"], X, dv["post"], dv["comb"], *mix, out=outs)
        check_new(cp.asnumpy(X), new, dtype, f"hc_post_pre {variant} in place")
        check_mix(host(outs[1:]), pre_of_stored(cp.asnumpy(X), inp), cp.asnumpy(X), f"hc_post_pre {variant} {config} in place")


# -- NaN isolation ------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [3, 64])
def test_nan_stays_in_its_token(cp, rng, B):
    D = 4096
    inp = make_inputs(rng, B, D, "bfloat16")
    X = inp["X"].copy()
    X[1, 2, 77] = np.nan
    y = inp["y"].copy()
    y[B - 1, 5] = np.nan
    want = reference_hc_pre(X, inp["hc_fn"], inp["hc_scale"], inp["hc_base"])
    new = reference_hc_post(y, X, inp["post"], inp["comb"])
    dv = device(cp, dict(inp, X=X, y=y))
    args = (dv["X"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    for variant, config in settings("hc_pre", *args):
        outs = pre_outs(cp, B, D)
        run("hc_pre", variant, config, *args, out=outs)
        got = host(outs)
        assert np.isnan(got[1][1]).all() and not np.isnan(np.delete(got[1], 1, 0)).any(), variant
        check_mix(got, want, X, f"NaN {variant} {config}")
    args = (dv["y"], dv["X"], dv["post"], dv["comb"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    for variant, config in settings("hc_post_pre", *args):
        outs = (poisoned(cp, (B, 4, D), BFLOAT16),) + pre_outs(cp, B, D)
        run("hc_post_pre", variant, config, *args, out=outs)
        got = host(outs)
        bad = {1, B - 1}
        assert all(np.isnan(got[2][t]).all() == (t in bad) for t in range(B)), variant
        check_new(got[0], new, "bfloat16", f"NaN {variant}: X_new")
        check_mix(got[1:], pre_of_stored(got[0], inp), got[0], f"NaN post_pre {variant} {config}")


# -- split's counters, graph capture --------------------------------------------------------------


@pytest.mark.parametrize("op", ["hc_pre", "hc_post_pre"])
def test_split_repeats_bit_for_bit_and_leaves_counters_zero(cp, rng, op):
    B, D = 5, 7168
    inp = make_inputs(rng, B, D, "bfloat16")
    dv = device(cp, inp)
    mix = (dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    args = (dv["X"],) + mix if op == "hc_pre" else (dv["y"], dv["X"], dv["post"], dv["comb"]) + mix
    require_support(op, "split", *args)
    first = host(OPS[op](*args, variant="split"))
    for _ in range(3):
        again = host(OPS[op](*args, variant="split"))
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)
    counters, _ = K._workspaces[key]
    assert int(cp.count_nonzero(counters)) == 0


def test_graph_capture_replays_every_variant(cp, rng):
    B, D = 8, 4096
    inp = make_inputs(rng, B, D, "bfloat16")
    dv = device(cp, inp)
    args = (dv["y"], dv["X"], dv["post"], dv["comb"], dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    want = host(hc_post_pre(*args, variant="naive"))
    for variant in supported_variants("hc_post_pre", *args):
        outs = (cp.empty((B, 4, D), BFLOAT16),) + pre_outs(cp, B, D)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            hc_post_pre(*args, out=outs, variant=variant)  # warm-up: compiles, makes the workspace
            for o in outs:
                o[...] = poisoned(cp, o.shape, o.dtype)
            s.synchronize()
            s.begin_capture()
            hc_post_pre(*args, out=outs, variant=variant)
            g = s.end_capture()
            for _ in range(3):
                g.launch(s)
            s.synchronize()
        got = host(outs)
        check_new(got[0], want[0], "bfloat16", f"graph {variant}")
        check_mix(got[1:], want[1:], want[0], f"graph {variant}")
