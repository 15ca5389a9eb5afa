"""KV compressor CUDA variants against the reference backend, on fresh random inputs.

Caches are poisoned (NaN) before each GPU run so unwritten or wrongly written rows fail; states
must match the reference exactly (they hold copies and one float32 addition), cache rows within
float32 (or the cache dtype's) rounding.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
from ds4kern.core import autotune
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.compressor import init_state, pool_groups, state_shape

pytestmark = pytest.mark.gpu

SETTINGS = [("naive", None), ("grouped", 2), ("grouped", 4)]  # on every ratio (supported_settings: all)
IO = {"f32": (np.float32, np.float32), "bf16": (BFLOAT16, BFLOAT16), "bf16>f32": (BFLOAT16, np.float32),
      "f16": (np.float16, np.float16)}
MAX_POS = 1 << 16


def tables(rng, R, d):
    c = 2 if R == 4 else 1
    ape = (0.5 * rng.standard_normal((R, c * d))).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    cos, sin = ds4kern.rope_table(MAX_POS, theta=160000.0, yarn_factor=16.0, original_max_pos=4096)
    return ape, w, cos, sin


def random_state(rng, B, R, d):
    shape = state_shape(B, R, d)
    ks = rng.standard_normal(shape).astype(np.float32)
    ss = (2 * rng.standard_normal(shape)).astype(np.float32)
    ss[rng.random(shape) < 0.05] = -np.inf  # rows that came from no token
    return ks, ss


def mixed_positions(rng, B, R, rows):
    """About half the rows emit; some in the first window (RoPE position 0), the rest anywhere."""
    p = rng.integers(0, rows * R, size=B)
    emit = rng.random(B) < 0.5
    p[emit] = (p[emit] // R) * R + R - 1
    if B > 2:
        p[0], p[1] = R - 1, 0
    return p.astype(np.int64)


def tols(cache_dtype):
    return dict(rtol=1e-2, atol=1e-2) if np.dtype(cache_dtype).itemsize == 2 else dict(rtol=1e-4, atol=2e-5)


def run_gpu(cp, host, variant, pool_group, ratio, **kw):
    """host: dict of numpy arrays; returns (state kv, state score, cache) after one GPU step."""
    dev = {k: cp.asarray(v) for k, v in host.items()}
    ds4kern.compress_decode(dev["kv"], dev["score"], dev["ape"], dev["norm_w"], dev["positions"], dev["rope_cos"],
                            dev["rope_sin"], dev["kv_state"], dev["score_state"], dev["cache"], ratio=ratio,
                            variant=variant, pool_group=pool_group, **kw)
    return cp.asnumpy(dev["kv_state"]), cp.asnumpy(dev["score_state"]), cp.asnumpy(dev["cache"])


def one_step_problem(rng, B, R, d, io, rows=6):
    tin, tout = IO[io]
    c = 2 if R == 4 else 1
    ape, w, cos, sin = tables(rng, R, d)
    ks, ss = random_state(rng, B, R, d)
    return dict(kv=rng.standard_normal((B, c * d)).astype(tin), score=(2 * rng.standard_normal((B, c * d))).astype(tin),
                ape=ape, norm_w=w, positions=mixed_positions(rng, B, R, rows), rope_cos=cos, rope_sin=sin,
                kv_state=ks, score_state=ss, cache=np.full((B, rows, d), np.nan, tout))


def supported_settings(cp, host, R):
    """(variant, pool_group) pairs the registry says can run this decode step: each supporting
    CUDA variant with each of its settings (``Variant.configs``)."""
    dev = {k: cp.asarray(v) for k, v in host.items()}
    d = ds4kern.explain("compress_decode", *(dev[k] for k in ("kv", "score", "ape", "norm_w", "positions",
                                                               "rope_cos", "rope_sin", "kv_state", "score_state",
                                                               "cache")), ratio=R)
    out = []
    for c in d.candidates:
        if c.rejected is None and c.variant.backend == "cuda":
            cfgs = c.variant.configs_for(d.problem)
            out += [(c.variant.name, cf["pool_group"]) for cf in cfgs] if cfgs else [(c.variant.name, None)]
    return out


def reference_step(host, R):
    ref = {k: v.copy() for k, v in host.items()}
    ds4kern.compress_decode(*(ref[k] for k in ("kv", "score", "ape", "norm_w", "positions", "rope_cos", "rope_sin",
                                               "kv_state", "score_state", "cache")), ratio=R)
    return ref


@pytest.mark.parametrize("B", [1, 3, 8, 64, 256])
@pytest.mark.parametrize("d", [512, 128])
@pytest.mark.parametrize("R", [4, 128])
def test_decode_step_matches_reference(cp, rng, R, d, B):
    host = one_step_problem(rng, B, R, d, "f32")
    ref = reference_step(host, R)
    outs = {}
    for variant, g in supported_settings(cp, host, R):
        ks, ss, cache = run_gpu(cp, host, variant, g, R)
        np.testing.assert_array_equal(ks, ref["kv_state"])
        np.testing.assert_array_equal(ss, ref["score_state"])
        np.testing.assert_allclose(cache, ref["cache"], equal_nan=True, **tols(np.float32))
        outs[g or 1] = cache
    for g, other in outs.items():  # every setting gives the same bits
        np.testing.assert_array_equal(other, outs[1], err_msg=f"pool_group={g} differs from naive")


@pytest.mark.parametrize("io", ["bf16", "bf16>f32", "f16"])
@pytest.mark.parametrize("R,d,B", [(4, 512, 64), (128, 128, 8), (128, 512, 256)])
def test_decode_step_narrow_dtypes(cp, rng, R, d, B, io):
    host = one_step_problem(rng, B, R, d, io)
    ref = reference_step(host, R)
    for variant, g in (SETTINGS[0], SETTINGS[2]):
        ks, ss, cache = run_gpu(cp, host, variant, g, R)
        np.testing.assert_array_equal(ks, ref["kv_state"])
        np.testing.assert_array_equal(ss, ref["score_state"])
        np.testing.assert_allclose(cache.astype(np.float32), ref["cache"].astype(np.float32), equal_nan=True,
                                   **tols(IO[io][1]))


def test_largest_every_row_emits(cp, rng):
    B, R, d = 256, 128, 512
    host = one_step_problem(rng, B, R, d, "bf16>f32", rows=8)
    host["positions"] = (rng.integers(0, 8, B) * R + R - 1).astype(np.int32)
    ref = reference_step(host, R)
    ks, ss, cache = run_gpu(cp, host, None, None, R)
    np.testing.assert_array_equal(ss, ref["score_state"])
    np.testing.assert_allclose(cache, ref["cache"], equal_nan=True, **tols(np.float32))
    assert (~np.isnan(cache)).sum() == B * d


@pytest.mark.parametrize("variant,g", [("naive", None), ("grouped", 2)])
@pytest.mark.parametrize("R", [4, 128])
def test_long_run_carries_state(cp, rng, R, variant, g):
    B, d = 3, 128
    c = 2 if R == 4 else 1
    ape, w, cos, sin = tables(rng, R, d)
    start = np.array([0, 2, R + 1], np.int64)
    steps = 2 * R + 5
    rows = (start.max() + steps) // R + 1
    h_ks, h_ss = init_state(B, R, d)
    h_cache = np.full((B, rows, d), np.nan, np.float32)
    d_ks, d_ss = (cp.asarray(a) for a in init_state(B, R, d))
    d_cache = cp.asarray(h_cache)
    args = [cp.asarray(a) for a in (ape, w)]
    dcos, dsin = cp.asarray(cos), cp.asarray(sin)
    for t in range(steps):
        kv = rng.standard_normal((B, c * d)).astype(np.float32)
        sc = (2 * rng.standard_normal((B, c * d))).astype(np.float32)
        ds4kern.compress_decode(kv, sc, ape, w, start + t, cos, sin, h_ks, h_ss, h_cache, ratio=R)
        ds4kern.compress_decode(cp.asarray(kv), cp.asarray(sc), *args, cp.asarray(start + t), dcos, dsin, d_ks, d_ss,
                                d_cache, ratio=R, variant=variant, pool_group=g)
    np.testing.assert_array_equal(cp.asnumpy(d_ks), h_ks)
    np.testing.assert_array_equal(cp.asnumpy(d_ss), h_ss)
    np.testing.assert_allclose(cp.asnumpy(d_cache), h_cache, equal_nan=True, **tols(np.float32))
    assert np.isfinite(h_cache[0, :2]).all()


@pytest.mark.parametrize("io", ["f32", "bf16"])
@pytest.mark.parametrize("d", [128, 512])
@pytest.mark.parametrize("R", [4, 128])
def test_prefill_then_decode_equals_decode_exactly(cp, rng, R, d, io):
    tin, tout = IO[io]
    c = 2 if R == 4 else 1
    B = 5
    ape, w, cos, sin = (cp.asarray(a) for a in tables(rng, R, d))
    start = np.array([0, 1, R - 1, R + 3, 2 * R], np.int64)
    S, extra = 2 * R + 5, R + 2
    rows = (start.max() + S + extra) // R + 1
    kv = rng.standard_normal((B, S + extra, c * d)).astype(tin)
    sc = (2 * rng.standard_normal((B, S + extra, c * d))).astype(tin)
    kv_d, sc_d = cp.asarray(kv), cp.asarray(sc)
    # decode only
    a_ks, a_ss = (cp.asarray(x) for x in random_state(rng, B, R, d))  # any state at `start`
    b_ks, b_ss = a_ks.copy(), a_ss.copy()
    h_ks, h_ss = cp.asnumpy(a_ks), cp.asnumpy(a_ss)
    a_cache = cp.full((B, rows, d), cp.nan, tout)
    b_cache = a_cache.copy()
    for t in range(S + extra):
        ds4kern.compress_decode(kv_d[:, t].copy(), sc_d[:, t].copy(), ape, w, cp.asarray(start + t), cos, sin, a_ks,
                                a_ss, a_cache, ratio=R, variant="naive")
    # prefill S tokens, then decode the rest
    ds4kern.compress_prefill(kv_d[:, :S].copy(), sc_d[:, :S].copy(), ape, w, cp.asarray(start), cos, sin, b_ks,
                             b_ss, b_cache, ratio=R)
    mid_cache, mid_ks = cp.asnumpy(b_cache), cp.asnumpy(b_ks)
    for t in range(S, S + extra):
        ds4kern.compress_decode(kv_d[:, t].copy(), sc_d[:, t].copy(), ape, w, cp.asarray(start + t), cos, sin, b_ks,
                                b_ss, b_cache, ratio=R, variant="grouped", pool_group=4)
    f32 = np.float32  # (NaN == NaN for float32 comparisons, not for ml_dtypes' bfloat16)
    np.testing.assert_array_equal(cp.asnumpy(b_cache).astype(f32), cp.asnumpy(a_cache).astype(f32))
    np.testing.assert_array_equal(cp.asnumpy(b_ks), cp.asnumpy(a_ks))
    np.testing.assert_array_equal(cp.asnumpy(b_ss), cp.asnumpy(a_ss))
    # the prefill alone against the reference prefill
    r_cache = np.full((B, rows, d), np.nan, tout)
    ds4kern.compress_prefill(kv[:, :S], sc[:, :S], *(cp.asnumpy(x) for x in (ape, w)), start, cp.asnumpy(cos),
                             cp.asnumpy(sin), h_ks, h_ss, r_cache, ratio=R)
    np.testing.assert_array_equal(mid_ks, h_ks)
    np.testing.assert_allclose(mid_cache.astype(np.float32), r_cache.astype(np.float32), equal_nan=True, **tols(tout))


def test_prefill_scalar_start_and_short_runs(cp, rng):
    R, d, B = 4, 128, 2
    ape, w, cos, sin = (cp.asarray(a) for a in tables(rng, R, d))
    for start, S in ((0, 1), (5, 2), (6, 3), (0, 4), (3, 9)):
        ks0, ss0 = random_state(rng, B, R, d)
        kv = rng.standard_normal((B, S, 2 * d)).astype(np.float32)
        sc = rng.standard_normal((B, S, 2 * d)).astype(np.float32)
        a_ks, a_ss, a_cache = cp.asarray(ks0), cp.asarray(ss0), cp.full((B, 4, d), cp.nan, cp.float32)
        ds4kern.compress_prefill(cp.asarray(kv), cp.asarray(sc), ape, w, start, cos, sin, a_ks, a_ss, a_cache, ratio=R)
        b_ks, b_ss, b_cache = cp.asarray(ks0), cp.asarray(ss0), cp.full((B, 4, d), cp.nan, cp.float32)
        for t in range(S):
            ds4kern.compress_decode(cp.asarray(kv[:, t]), cp.asarray(sc[:, t]), ape, w,
                                    cp.full(B, start + t, cp.int32), cos, sin, b_ks, b_ss, b_cache, ratio=R)
        np.testing.assert_array_equal(cp.asnumpy(a_cache), cp.asnumpy(b_cache))
        np.testing.assert_array_equal(cp.asnumpy(a_ks), cp.asnumpy(b_ks))
        np.testing.assert_array_equal(cp.asnumpy(a_ss), cp.asnumpy(b_ss))


@pytest.mark.parametrize("R", [4, 128])
def test_dead_window_zeros(cp, rng, R):
    B, d = 3, 512
    host = one_step_problem(rng, B, R, d, "f32")
    host["positions"] = np.full(B, 2 * R - 1, np.int64)
    host["score_state"][0] = -np.inf
    host["score"][0] = -np.inf
    for variant, g in supported_settings(cp, host, R):
        _, _, cache = run_gpu(cp, host, variant, g, R)
        assert (cache[0, 1] == 0).all()
        assert np.isfinite(cache[1:, 1]).all()


def test_bad_positions_are_counted_and_skipped(cp, rng):
    R, d, B = 4, 128, 6
    host = one_step_problem(rng, B, R, d, "f32", rows=4)
    host["rope_cos"], host["rope_sin"] = host["rope_cos"][:8].copy(), host["rope_sin"][:8].copy()
    host["positions"] = np.array([3, -1, 16, 7, 11, 14], np.int64)  # -1: negative; 16: row 4; 11: rope 8
    for variant, g in SETTINGS[:2]:
        errors = cp.zeros(1, cp.int32)
        ks, ss, cache = run_gpu(cp, host, variant, g, R, errors=errors)
        assert int(errors[0]) == 3
        for b in (1, 2, 4):
            np.testing.assert_array_equal(ks[b], host["kv_state"][b])
            np.testing.assert_array_equal(ss[b], host["score_state"][b])
            assert np.isnan(cache[b]).all()
        good = host.copy()
        keep = [0, 3, 5]
        good = {k: (v[keep] if k in ("kv", "score", "positions", "kv_state", "score_state", "cache") else v)
                for k, v in host.items()}
        ref = reference_step(good, R)
        np.testing.assert_array_equal(ks[keep], ref["kv_state"])
        np.testing.assert_allclose(cache[keep], ref["cache"], equal_nan=True, **tols(np.float32))


def test_prefill_bad_rows_are_counted(cp, rng):
    R, d, B = 4, 128, 2
    ape, w, cos, sin = (cp.asarray(a) for a in tables(rng, R, d))
    ks, ss = (cp.asarray(a) for a in random_state(rng, B, R, d))
    before = cp.asnumpy(ks)
    kv = cp.asarray(rng.standard_normal((B, 6, 2 * d)).astype(np.float32))
    cache = cp.full((B, 3, d), cp.nan, cp.float32)
    errors = cp.zeros(1, cp.int32)
    ds4kern.compress_prefill(kv, kv, ape, w, cp.asarray(np.array([0, 8], np.int64)), cos, sin, ks, ss, cache,
                             ratio=R, errors=errors)
    assert int(errors[0]) == 1  # row 1 reaches position 13: cache row 3 of 3
    np.testing.assert_array_equal(cp.asnumpy(ks)[1], before[1])
    assert np.isnan(cp.asnumpy(cache)[1]).all() and np.isfinite(cp.asnumpy(cache)[0, :1]).all()


def test_torch_tensors_zero_copy(cp, rng):
    torch = pytest.importorskip("torch")
    R, d, B = 128, 128, 4
    host = one_step_problem(rng, B, R, d, "f32")
    ref = reference_step(host, R)
    t = {k: torch.from_numpy(v).cuda() for k, v in host.items()}
    out = ds4kern.compress_decode(*(t[k] for k in ("kv", "score", "ape", "norm_w", "positions", "rope_cos", "rope_sin",
                                                    "kv_state", "score_state", "cache")), ratio=R)
    assert out is t["cache"]
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t["kv_state"].cpu().numpy(), ref["kv_state"])
    np.testing.assert_allclose(t["cache"].cpu().numpy(), ref["cache"], equal_nan=True, **tols(np.float32))


def test_cuda_graph_capture(cp, rng):
    R, d, B = 4, 512, 8
    host = one_step_problem(rng, B, R, d, "f32")
    host["positions"] = np.full(B, 7, np.int64)
    ref = reference_step(host, R)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    names = ("kv", "score", "ape", "norm_w", "positions", "rope_cos", "rope_sin", "kv_state", "score_state", "cache")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        warm = {k: v.copy() for k, v in dev.items()}
        ds4kern.compress_decode(*(warm[k] for k in names), ratio=R)  # compile outside the capture
        s.begin_capture()
        ds4kern.compress_decode(*(dev[k] for k in names), ratio=R)
        g = s.end_capture()
        g.launch(s)
        s.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(dev["kv_state"]), ref["kv_state"])
    np.testing.assert_allclose(cp.asnumpy(dev["cache"]), ref["cache"], equal_nan=True, **tols(np.float32))


def test_autotune_picks_a_setting_and_leaves_the_callers_buffers_alone(cp, rng, tmp_path, monkeypatch,
                                                                        clean_overrides):
    monkeypatch.setenv("DS4KERN_CACHE_DIR", str(tmp_path))
    R, d, B = 4, 512, 64
    host = one_step_problem(rng, B, R, d, "f32")
    ref = reference_step(host, R)
    autotune.clear()
    autotune.enable(True, repeat=5)
    try:
        ks, ss, cache = run_gpu(cp, host, None, None, R)
        entry = next(iter(json.loads((tmp_path / "autotune.json").read_text())["entries"].values()))
        assert set(entry["times_us"]) == {"naive", "grouped[pool_group=2]", "grouped[pool_group=4]",
                                          "grouped[pool_group=8]"}
        label = min(entry["times_us"], key=entry["times_us"].get)
        assert autotune.entry_label(entry) == label
        dev = {k: cp.asarray(v) for k, v in host.items()}
        dd = ds4kern.explain("compress_decode", dev["kv"], dev["score"], dev["ape"], dev["norm_w"], dev["positions"],
                             dev["rope_cos"], dev["rope_sin"], dev["kv_state"], dev["score_state"], dev["cache"], ratio=R)
        assert dd.how == "autotune" and "cached winner" in dd.why and dd.chosen.label == label
    finally:
        autotune._state["enabled"] = None
        autotune.clear()
    # tuning ran the candidates on scratch copies: the call's result is one step, not several
    np.testing.assert_array_equal(ks, ref["kv_state"])
    np.testing.assert_array_equal(ss, ref["score_state"])
    np.testing.assert_allclose(cache, ref["cache"], equal_nan=True, **tols(np.float32))


def test_launch_counts(cp, rng):
    """One kernel per decode step (every batch row, emitting or not); two for a prefill."""
    from graph_nodes import count_kernel_nodes

    R, d, B = 4, 512, 8
    host = one_step_problem(rng, B, R, d, "f32")
    dev = {k: cp.asarray(v) for k, v in host.items()}
    names = ("kv", "score", "ape", "norm_w", "positions", "rope_cos", "rope_sin", "kv_state", "score_state", "cache")
    assert count_kernel_nodes(cp, lambda: ds4kern.compress_decode(*(dev[k] for k in names), ratio=R)) == 1
    kv = cp.asarray(rng.standard_normal((B, 9, 2 * d)).astype(np.float32))
    args = [dev[k] for k in ("ape", "norm_w")]
    assert count_kernel_nodes(cp, lambda: ds4kern.compress_prefill(
        kv, kv, *args, 0, dev["rope_cos"], dev["rope_sin"], dev["kv_state"], dev["score_state"], dev["cache"],
        ratio=R)) == 2


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from([4, 128]), st.sampled_from([128, 512]), st.integers(1, 300), st.sampled_from(sorted(IO)),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_property_every_supported_setting(cp, R, d, B, io, strided, seed):
    """Random decode steps (batch, ratio, width, dtypes, strided kv / score): every CUDA variant
    and setting the registry says can run the problem equals the reference, and all give the same
    bits; then a prefill of the next tokens equals decode steps.  Derandomised."""
    rng = np.random.default_rng(seed)
    host = one_step_problem(rng, B, R, d, io)
    ref = reference_step(host, R)
    outs = {}
    for variant, g in supported_settings(cp, host, R):
        dev = {k: cp.asarray(v) for k, v in host.items()}
        if strided:  # every other row of a wider buffer
            for key in ("kv", "score"):
                wide = cp.full((2 * B,) + host[key].shape[1:], cp.nan, dtype=host[key].dtype)
                wide[::2] = dev[key]
                dev[key] = wide[::2]
        ds4kern.compress_decode(*(dev[k] for k in ("kv", "score", "ape", "norm_w", "positions", "rope_cos",
                                                   "rope_sin", "kv_state", "score_state", "cache")), ratio=R,
                                variant=variant, pool_group=g)
        np.testing.assert_array_equal(cp.asnumpy(dev["kv_state"]), ref["kv_state"])
        np.testing.assert_array_equal(cp.asnumpy(dev["score_state"]), ref["score_state"])
        cache = cp.asnumpy(dev["cache"])
        np.testing.assert_allclose(cache.astype(np.float32), ref["cache"].astype(np.float32), equal_nan=True,
                                   **tols(IO[io][1]))
        outs[(variant, g)] = cache
    first = next(iter(outs.values()))
    for key, other in outs.items():  # bits (NaN != NaN for ml_dtypes' bfloat16 in numpy's comparisons)
        np.testing.assert_array_equal(other.view(np.uint8), first.view(np.uint8), err_msg=f"{key} differs")



@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from([4, 128]), st.sampled_from([128, 512]), st.integers(1, 6), st.integers(1, 300),
       st.sampled_from(["f32", "bf16", "bf16>f32"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_property_prefill_every_supported_variant(cp, R, d, B, S, io, scalar_start, seed):
    """Random prefill runs (ratio, width, batch, length, per-row or scalar start): every CUDA
    variant the registry says can run the problem equals the reference prefill."""
    from conftest import supported_variants

    rng = np.random.default_rng(seed)
    tin, tout = IO[io]
    c = 2 if R == 4 else 1
    ape, w, cos, sin = tables(rng, R, d)
    start = int(rng.integers(0, 3 * R)) if scalar_start else rng.integers(0, 3 * R, B).astype(np.int64)
    rows = (int(np.max(start)) + S) // R + 1
    kv = rng.standard_normal((B, S, c * d)).astype(tin)
    sc = (2 * rng.standard_normal((B, S, c * d))).astype(tin)
    ks, ss = random_state(rng, B, R, d)
    r_ks, r_ss, r_cache = ks.copy(), ss.copy(), np.full((B, rows, d), np.nan, tout)
    ds4kern.compress_prefill(kv, sc, ape, w, start, cos, sin, r_ks, r_ss, r_cache, ratio=R)
    dev = lambda: [cp.asarray(x) for x in (kv, sc, ape, w)] + [start if scalar_start else cp.asarray(start)] + \
        [cp.asarray(x) for x in (cos, sin, ks, ss, np.full((B, rows, d), np.nan, tout))]  # noqa: E731
    names = supported_variants("compress_prefill", *dev(), ratio=R)
    assert names
    for name in names:
        args = dev()
        ds4kern.compress_prefill(*args, ratio=R, variant=name)
        # (kv, score, ape, norm_w, start, rope_cos, rope_sin, kv_state, score_state, cache)
        np.testing.assert_array_equal(cp.asnumpy(args[7]), r_ks)
        np.testing.assert_array_equal(cp.asnumpy(args[8]), r_ss)
        np.testing.assert_allclose(cp.asnumpy(args[9]).astype(np.float32), r_cache.astype(np.float32),
                                   equal_nan=True, **tols(tout))
