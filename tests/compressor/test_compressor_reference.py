"""KV compressor on the reference backend: against a slow per-definition transcription of the spec
(scipy softmax in float64, one batch row and one step at a time), prefill == decode, the all -inf
rule, validation errors, the RoPE tables, and the dispatcher's tunable settings."""

import math

import numpy as np
import pytest
from scipy.special import softmax

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.compressor import init_state, state_shape
from ds4kern.rope import rope_frequencies


def make_inputs(rng, B, R, d, dtype=np.float32, max_pos=2048):
    c = 2 if R == 4 else 1
    ape = (0.5 * rng.standard_normal((R, c * d))).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    cos, sin = ds4kern.rope_table(max_pos, theta=160000.0)
    return ape, w, cos, sin


def token(rng, B, R, d, dtype=np.float32):
    c = 2 if R == 4 else 1
    return (rng.standard_normal((B, c * d)).astype(dtype), (2 * rng.standard_normal((B, c * d))).astype(dtype))


def spec_step(kv, sc_in, ape, w, p, cos, sin, ks, ss, R, eps=1e-6):
    """The spec's pseudo-code for one batch row, literally; returns the emitted row or None."""
    d = w.shape[0]
    sc = (sc_in.astype(np.float32) + ape[p % R]).astype(np.float32)
    row = R + p % R if R == 4 else p % R
    ks[row], ss[row] = kv.astype(np.float32), sc
    if (p + 1) % R != 0:
        return None
    if R == 4:
        K = np.concatenate([ks[0:4, :d], ks[4:8, d:]]).astype(np.float64)
        S = np.concatenate([ss[0:4, :d], ss[4:8, d:]]).astype(np.float64)
    else:
        K, S = ks.astype(np.float64), ss.astype(np.float64)
    if np.all(S == -np.inf, axis=0).any():
        dead = np.all(S == -np.inf, axis=0)
        S = np.where(dead, 0.0, S)  # softmax of a dead column is irrelevant: its K is zeroed below
        K = np.where(dead, 0.0, K)
    c = (K * softmax(S, axis=0)).sum(axis=0)
    if R == 4:
        ks[0:4], ss[0:4] = ks[4:8].copy(), ss[4:8].copy()
    c = c / math.sqrt(float((c * c).mean()) + eps) * w.astype(np.float64)
    q = p + 1 - R
    for i in range(32):
        x0, x1 = c[d - 64 + 2 * i], c[d - 64 + 2 * i + 1]
        cs, sn = float(cos[q, i]), float(sin[q, i])
        c[d - 64 + 2 * i], c[d - 64 + 2 * i + 1] = x0 * cs - x1 * sn, x0 * sn + x1 * cs
    return c


@pytest.mark.parametrize("R,d", [(4, 128), (4, 64), (128, 64)])
def test_reference_matches_spec_transcription(rng, R, d):
    B = 3
    ape, w, cos, sin = make_inputs(rng, B, R, d)
    ks, ss = init_state(B, R, d)
    sks, sss = ks.copy(), ss.copy()
    start = np.array([0, 3, R + 1])  # rows at different positions; row 1 starts mid-window
    steps = 2 * R + 3
    cache = np.full((B, (start.max() + steps) // R + 1, d), np.nan, np.float32)
    want = cache.copy().astype(np.float64)
    for t in range(steps):
        kv, sc = token(rng, B, R, d)
        ds4kern.compress_decode(kv, sc, ape, w, start + t, cos, sin, ks, ss, cache, ratio=R)
        for b in range(B):
            p = int(start[b] + t)
            row = spec_step(kv[b], sc[b], ape, w, p, cos, sin, sks[b], sss[b], R)
            if row is not None:
                want[b, p // R] = row
    np.testing.assert_array_equal(ks, sks)
    np.testing.assert_array_equal(ss, sss)
    np.testing.assert_allclose(cache, want, rtol=2e-6, atol=2e-6, equal_nan=True)
    assert np.isfinite(cache[0, : steps // R]).all()


def test_dead_window_gives_zeros_not_nan(rng):
    for R, d in ((4, 128), (128, 64)):
        B = 2
        ape, w, cos, sin = make_inputs(rng, B, R, d)
        ks, ss = init_state(B, R, d)
        cache = np.full((B, 2, d), np.nan, np.float32)
        for t in range(R):
            kv, sc = token(rng, B, R, d)
            sc[0] = -np.inf  # row 0: every score of its first window is -inf
            ds4kern.compress_decode(kv, sc, ape, w, np.full(B, t), cos, sin, ks, ss, cache, ratio=R)
        assert (cache[0, 0] == 0).all()
        assert np.isfinite(cache[1, 0]).all() and (cache[1, 0] != 0).any()
        assert np.isnan(cache[:, 1]).all()  # nothing emitted there


def test_ratio4_first_window_pools_only_its_back_half(rng):
    R, d, B = 4, 64, 1
    ape, w, cos, sin = make_inputs(rng, B, R, d)
    ks, ss = init_state(B, R, d)
    cache = np.zeros((B, 1, d), np.float32)
    kvs, scs = [], []
    for t in range(4):
        kv, sc = token(rng, B, R, d)
        kvs.append(kv[0])
        scs.append(sc[0] + ape[t])
        ds4kern.compress_decode(kv, sc, ape, w, np.array([t]), cos, sin, ks, ss, cache, ratio=R)
    K, S = np.array(kvs)[:, d:].astype(np.float64), np.array(scs)[:, d:].astype(np.float64)
    c = (K * softmax(S, axis=0)).sum(0)
    c = c / np.sqrt((c * c).mean() + 1e-6) * w  # RoPE at position 0 is the identity
    np.testing.assert_allclose(cache[0, 0], c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R", [4, 128])
def test_prefill_then_decode_equals_decode(rng, R):
    B, d = 3, 64
    ape, w, cos, sin = make_inputs(rng, B, R, d)
    S, extra = 2 * R + 5, R + 2
    start = np.array([0, 1, R - 1], dtype=np.int64)
    toks = [token(rng, B, R, d) for _ in range(S + extra)]
    rows = (start.max() + S + extra) // R + 1
    a_ks, a_ss = init_state(B, R, d)
    a_cache = np.full((B, rows, d), np.nan, np.float32)
    for t, (kv, sc) in enumerate(toks):
        ds4kern.compress_decode(kv, sc, ape, w, start + t, cos, sin, a_ks, a_ss, a_cache, ratio=R)
    b_ks, b_ss = init_state(B, R, d)
    b_cache = np.full((B, rows, d), np.nan, np.float32)
    kv = np.stack([t[0] for t in toks[:S]], axis=1)
    sc = np.stack([t[1] for t in toks[:S]], axis=1)
    ds4kern.compress_prefill(kv, sc, ape, w, start, cos, sin, b_ks, b_ss, b_cache, ratio=R)
    for t in range(S, S + extra):
        ds4kern.compress_decode(*toks[t], ape, w, start + t, cos, sin, b_ks, b_ss, b_cache, ratio=R)
    np.testing.assert_array_equal(a_cache, b_cache)
    np.testing.assert_array_equal(a_ks, b_ks)
    np.testing.assert_array_equal(a_ss, b_ss)


def test_bfloat16_inputs_and_cache(rng):
    R, d, B = 4, 128, 2
    ape, w, cos, sin = make_inputs(rng, B, R, d)
    ks, ss = init_state(B, R, d)
    cache = np.zeros((B, 2, d), BFLOAT16)
    ks2, ss2 = init_state(B, R, d)
    cache32 = np.zeros((B, 2, d), np.float32)
    for t in range(8):
        kv, sc = token(rng, B, R, d, BFLOAT16)
        ds4kern.compress_decode(kv, sc, ape, w, np.full(B, t), cos, sin, ks, ss, cache, ratio=R)
        ds4kern.compress_decode(kv.astype(np.float32), sc.astype(np.float32), ape, w, np.full(B, t), cos, sin,
                                ks2, ss2, cache32, ratio=R)
    np.testing.assert_array_equal(ks, ks2)
    np.testing.assert_allclose(cache.astype(np.float32), cache32, rtol=8e-3, atol=1e-6)


def test_empty_batch_and_empty_prefill(rng):
    R, d = 4, 64
    ape, w, cos, sin = make_inputs(rng, 0, R, d)
    ks, ss = init_state(0, R, d)
    cache = np.zeros((0, 3, d), np.float32)
    kv = np.zeros((0, 2 * d), np.float32)
    assert ds4kern.compress_decode(kv, kv, ape, w, np.zeros(0, np.int32), cos, sin, ks, ss, cache, ratio=R) is cache
    ks, ss = init_state(2, R, d)
    before = ks.copy()
    e = np.zeros((2, 0, 2 * d), np.float32)
    ds4kern.compress_prefill(e, e, ape, w, 5, cos, sin, ks, ss, np.zeros((2, 3, d), np.float32), ratio=R)
    np.testing.assert_array_equal(ks, before)


def _args(rng, R=4, d=64, B=2):
    ape, w, cos, sin = make_inputs(rng, B, R, d, max_pos=64)
    ks, ss = init_state(B, R, d)
    kv, sc = token(rng, B, R, d)
    cache = np.zeros((B, 4, d), np.float32)
    return dict(kv=kv, score=sc, ape=ape, norm_w=w, positions=np.array([3, 7]), rope_cos=cos, rope_sin=sin,
                kv_state=ks, score_state=ss, cache=cache)


@pytest.mark.parametrize("change,exc,words", [
    (dict(ratio=8), ValueError, "ratio"),
    (dict(kv=np.zeros((2, 100), np.float32)), ValueError, "kv"),
    (dict(kv=np.zeros((2, 128), np.float64)), TypeError, "kv"),
    (dict(score=np.zeros((2, 128), np.float16)), TypeError, "score"),
    (dict(ape=np.zeros((3, 128), np.float32)), ValueError, "ape"),
    (dict(norm_w=np.zeros(32, np.float32)), ValueError, "norm_w"),
    (dict(norm_w=np.zeros(64, np.float16)), TypeError, "norm_w"),
    (dict(positions=np.array([3.0, 7.0])), TypeError, "positions"),
    (dict(positions=np.array([3, 7, 11])), ValueError, "positions"),
    (dict(positions=np.array([-1, 7])), ValueError, "positions"),
    (dict(positions=np.array([3, 19])), ValueError, "cache row"),
    (dict(rope_cos=np.zeros((64, 16), np.float32)), ValueError, "rope_cos"),
    (dict(rope_sin=np.zeros((32, 32), np.float32)), ValueError, "rope_sin"),
    (dict(kv_state=np.zeros((2, 8, 64), np.float32)), ValueError, "kv_state"),
    (dict(score_state=np.zeros((2, 8, 256), np.float32)[:, :, ::2]), ValueError, "contiguous"),
    (dict(cache=np.zeros((2, 4, 64), np.float16)), TypeError, "cache"),
    (dict(cache=np.zeros((3, 4, 64), np.float32)), ValueError, "cache"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(errors=np.zeros(1, np.int32)), TypeError, "errors"),
    (dict(pool_group=3), ValueError, "pool_group"),
    (dict(pool_group=4, variant="naive"), ValueError, "pool_group"),
    (dict(variant="nope"), ValueError, "nope"),
])
def test_decode_validation(rng, change, exc, words):
    a = _args(rng)
    kw = {"ratio": 4}
    for k in ("ratio", "eps", "errors", "pool_group", "variant"):
        if k in change:
            kw[k] = change.pop(k)
    a.update(change)
    with pytest.raises(exc, match=words):
        ds4kern.compress_decode(**a, **kw)



@pytest.mark.parametrize("same", [("kv_state", "score_state"), ("kv_state", "cache"), ("score_state", "cache")])
def test_in_place_buffers_must_be_separate(rng, same):
    """As on the GPU: one array given twice would be updated twice (garbage, not an error)."""
    a = _args(rng)
    buf = np.zeros(max(a[same[0]].size, a[same[1]].size), np.float32)
    a[same[0]] = buf[:a[same[0]].size].reshape(a[same[0]].shape)
    a[same[1]] = buf[:a[same[1]].size].reshape(a[same[1]].shape)
    with pytest.raises(ValueError, match="overlap in memory"):
        ds4kern.compress_decode(**a, ratio=4)


def test_read_only_state_is_refused_by_name(rng):
    a = _args(rng)
    a["score_state"].setflags(write=False)
    with pytest.raises(ValueError, match="score_state is read-only"):
        ds4kern.compress_decode(**a, ratio=4)

def test_rope_position_beyond_table_is_rejected(rng):
    a = _args(rng)
    a["rope_cos"], a["rope_sin"] = a["rope_cos"][:3], a["rope_sin"][:3]
    with pytest.raises(ValueError, match="RoPE position 4"):
        ds4kern.compress_decode(**a, ratio=4)


def test_prefill_validation(rng):
    a = _args(rng)
    a.pop("positions")
    kv3 = np.zeros((2, 5, 128), np.float32)
    with pytest.raises(ValueError, match="start"):
        ds4kern.compress_prefill(**{**a, "kv": kv3, "score": kv3}, start=-1, ratio=4)
    with pytest.raises(ValueError, match="kv must have shape"):
        ds4kern.compress_prefill(**a, start=0, ratio=4)
    with pytest.raises(ValueError, match="start: cache row"):
        ds4kern.compress_prefill(**{**a, "kv": kv3, "score": kv3}, start=np.array([0, 16]), ratio=4)


def test_reference_never_touches_state_on_bad_input(rng):
    a = _args(rng)
    before = a["kv_state"].copy()
    a["positions"] = np.array([3, 1000])
    with pytest.raises(ValueError):
        ds4kern.compress_decode(**a, ratio=4)
    np.testing.assert_array_equal(a["kv_state"], before)


def test_state_shape_helper():
    assert state_shape(3, 4, 512) == (3, 8, 1024)
    assert state_shape(3, 128, 128) == (3, 128, 128)
    ks, ss = init_state(1, 4, 64)
    assert (ks == 0).all() and (ss == -np.inf).all() and ks.dtype == np.float32


# ---- RoPE tables ------------------------------------------------------------------------

def test_rope_plain_matches_definition():
    cos, sin = ds4kern.rope_table(50, dim=64, theta=160000.0)
    assert cos.shape == (50, 32) and cos.dtype == np.float32
    for pos in (0, 1, 17, 49):
        for i in (0, 5, 31):
            ang = pos * 160000.0 ** (-2 * i / 64)
            assert cos[pos, i] == np.float32(math.cos(ang)) and sin[pos, i] == np.float32(math.sin(ang))


def test_rope_yarn_matches_definition():
    dim, theta, factor, orig, bf, bs = 64, 160000.0, 16.0, 65536, 32.0, 1.0
    got = rope_frequencies(dim, theta, yarn_factor=factor, original_max_pos=orig, beta_fast=bf, beta_slow=bs)

    def corr(n):  # the number of the dimension that turns n times over the original length
        return dim * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), dim - 1)
    assert 0 < low < high < dim // 2  # the blend is exercised on both sides
    for i in range(dim // 2):
        f = theta ** (-2 * i / dim)
        t = min(max((i - low) / (high - low), 0.0), 1.0)
        want = f * (1 - t) + f / factor * t
        assert got[i] == pytest.approx(want, rel=1e-14)
    assert got[0] == 1.0 and got[-1] == pytest.approx(theta ** (-(dim - 2) / dim) / factor)
    cos, sin = ds4kern.rope_table(10, yarn_factor=factor, theta=theta, original_max_pos=orig)
    np.testing.assert_array_equal(cos[3], np.cos(3 * got).astype(np.float32))


@pytest.mark.parametrize("kw,words", [(dict(max_pos=0), "max_pos"), (dict(max_pos=4, dim=63), "even"),
                                      (dict(max_pos=4, theta=-1.0), "theta"),
                                      (dict(max_pos=4, yarn_factor=0.0), "yarn_factor")])
def test_rope_validation(kw, words):
    with pytest.raises(ValueError, match=words):
        ds4kern.rope_table(**kw)


# ---- the dispatcher's tunable settings (pool_group) --------------------------------------

def test_explain_lists_compressor_variants(rng):
    a = _args(rng)
    d = ds4kern.explain("compress_decode", **a, ratio=4)
    assert d.chosen.name == "reference"
    names = [c.variant.name for c in d.candidates]
    assert names[:3] == ["reference", "naive", "grouped"]
    with pytest.raises(ValueError, match="needs an explicit variant|cannot run"):
        ds4kern.explain("compress_decode", **a, ratio=4, pool_group=2)
