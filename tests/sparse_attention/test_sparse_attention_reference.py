"""sparse_attention on the reference backend: against an independent dense float64 formulation
(scores over the whole pool, slot multiplicities as log-weights, the sink appended as one more
logit whose column is dropped), the FP8 row codec (against ml_dtypes and brute force), validation
errors, bad slots / positions, NaN isolation, the lse merge rule, explain, the rule, and split_k's
scratch formula."""

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp, softmax

import ds4kern
import ds4kern.ops.sparse_attention  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.kernels import source_define
from ds4kern.ops.sparse_attention import (kernels, pack_kv_fp8, reference_pack_kv_fp8, rule, sparse_attention,
                                          split_k_plan, split_k_scratch_bytes, unpack_kv_fp8)
from ds4kern.ops.sparse_attention.api import SparseAttentionProblem
from ds4kern.ops.sparse_attention.reference import encode_e4m3, tile_exponents

OP = "sparse_attention"


# -- inputs ------------------------------------------------------------------------------------


def make(rng, N, H, K, P, fmt="bf16", invalid=0.1, scale_q=1.0):
    q = (scale_q * rng.standard_normal((N, H, 512))).astype(BFLOAT16)
    kv = rng.standard_normal((P, 512)).astype(BFLOAT16)
    idx = rng.integers(0, P, (N, K)).astype(np.int32)
    idx[rng.random((N, K)) < invalid] = -1
    if K > 1:
        idx[:, -1] = idx[:, 0]  # a repeated slot in every row
    sink = rng.standard_normal(H).astype(np.float32)
    pool = pack_kv_fp8(kv) if fmt == "fp8" else kv
    return q, pool, idx, sink


def decode_fp8_independent(packed):
    """FP8 rows -> float64 through ml_dtypes' e4m3 (not the reference's table)."""
    b = np.asarray(packed)
    vals = b[:, :448].copy().view(ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(-1, 7, 64)
    scale = np.array([[math.ldexp(1.0, int(x) - 127) for x in row] for row in b[:, 576:583]]).reshape(-1, 7, 1)
    rope = b[:, 448:576].copy().view(BFLOAT16).astype(np.float64)
    return np.concatenate([(vals * scale).reshape(-1, 448), rope], axis=1)


def dense(q, pool, idx, sink, scale, fmt="bf16", positions=None, cos=None, sin=None):
    """Dense formulation: logits over the whole pool plus log(multiplicity), the sink as an extra
    logit; softmax over P + 1 and the sink's column dropped."""
    V = decode_fp8_independent(pool) if fmt == "fp8" else np.asarray(pool).astype(np.float64)
    N, H, _ = q.shape
    P = V.shape[0]
    o = np.zeros((N, H, 512))
    lse = np.full((N, H), -np.inf)
    for n in range(N):
        count = np.zeros(P)
        valid = idx[n][idx[n] >= 0]
        np.add.at(count, valid, 1.0)
        if not count.any():
            continue
        with np.errstate(divide="ignore"):
            logw = np.log(count)
        s = q[n].astype(np.float64) @ V.T * scale + logw  # [H, P], -inf where count is 0
        full = np.concatenate([s, sink.astype(np.float64)[:, None]], axis=1)
        w = softmax(full, axis=1)[:, :P]
        o[n] = w @ V
        lse[n] = logsumexp(s, axis=1)
    if positions is not None:
        for n in range(N):
            p = int(positions[n])
            for i in range(32):
                c, s_ = float(cos[p, i]), float(sin[p, i])
                x0, x1 = o[n, :, 448 + 2 * i].copy(), o[n, :, 449 + 2 * i].copy()
                o[n, :, 448 + 2 * i] = x0 * c + x1 * s_
                o[n, :, 449 + 2 * i] = -x0 * s_ + x1 * c
    return o, lse


def bf16_close(got, want):
    """The reference rounds float64 once to bf16: within half a bf16 ulp (plus float32 rounding)."""
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), want, rtol=2 ** -8, atol=1e-6)


# -- reference against the dense formulation -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("N,H,K,P", [(1, 1, 1, 4), (3, 8, 64, 200), (4, 16, 130, 97), (2, 64, 640, 1500),
                                     (1, 128, 1152, 2000)])
def test_reference_matches_dense(rng, fmt, N, H, K, P):
    q, pool, idx, sink = make(rng, N, H, K, P, fmt)
    lse = np.empty((N, H), np.float32)
    o = sparse_attention(q, pool, idx, sink, kv_format=fmt, lse=lse)
    want, wlse = dense(q, pool, idx, sink, 512 ** -0.5, fmt)
    assert o.dtype == BFLOAT16 and o.shape == (N, H, 512)
    bf16_close(o, want)
    np.testing.assert_allclose(lse, wlse, rtol=1e-6, atol=1e-6)


def test_inverse_rope_and_scale(rng):
    N, H, K, P = 5, 8, 40, 64
    q, pool, idx, sink = make(rng, N, H, K, P)
    cos, sin = ds4kern.rope_table(4096, theta=160000.0, yarn_factor=16.0, original_max_pos=4096)
    pos = rng.integers(0, 4096, N).astype(np.int64)
    o = sparse_attention(q, pool, idx, sink, scale=0.1, positions=pos, rope=(cos, sin))
    want, _ = dense(q, pool, idx, sink, 0.1, positions=pos, cos=cos, sin=sin)
    bf16_close(o, want)
    # the inverse undoes the compressor's forward rotation
    no_rope = sparse_attention(q, pool, idx, sink, scale=0.1).astype(np.float64)
    x0, x1 = o[..., 448::2].astype(np.float64), o[..., 449::2].astype(np.float64)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    np.testing.assert_allclose(x0 * c - x1 * s, no_rope[..., 448::2], atol=2e-2)
    np.testing.assert_allclose(x0 * s + x1 * c, no_rope[..., 449::2], atol=2e-2)


def test_invalid_repeated_and_empty_rows(rng):
    N, H, K, P = 4, 4, 16, 32
    q, pool, idx, sink = make(rng, N, H, K, P, invalid=0.0)
    idx[0] = -1                       # no valid slot: zeros
    idx[1] = 7                        # one slot 16 times
    idx[2, ::2] = -1                  # half invalid
    lse = np.empty((N, H), np.float32)
    o = sparse_attention(q, pool, idx, sink, lse=lse).astype(np.float64)
    assert (o[0] == 0).all() and np.isneginf(lse[0]).all()
    want, wlse = dense(q, pool, idx, sink, 512 ** -0.5)
    bf16_close(o, want)
    np.testing.assert_allclose(lse[1:], wlse[1:], rtol=1e-6, atol=1e-6)
    # one slot repeated c times: o = c e v / (c e + e^sink) with e = exp(s)
    s = q[1].astype(np.float64) @ pool[7].astype(np.float64) * 512 ** -0.5
    w = 16 * np.exp(s) / (16 * np.exp(s) + np.exp(sink.astype(np.float64)))
    bf16_close(o[1], w[:, None] * pool[7].astype(np.float64)[None, :])


def test_sink_only_denominator(rng):
    q, pool, idx, _ = make(rng, 2, 4, 8, 16)
    no_sink = np.full(4, -np.inf, np.float32)
    big = np.full(4, 60.0, np.float32)
    o0 = sparse_attention(q, pool, idx, no_sink).astype(np.float64)
    o1 = sparse_attention(q, pool, idx, big).astype(np.float64)
    assert np.abs(o1).max() < 1e-20  # the sink takes (almost) all the weight
    want, _ = dense(q, pool, idx, no_sink, 512 ** -0.5)
    bf16_close(o0, want)


def test_nan_in_q_stays_in_its_row(rng):
    N, H = 3, 8
    q, pool, idx, sink = make(rng, N, H, 24, 50)
    q[1, 5, 100] = np.nan
    lse = np.empty((N, H), np.float32)
    o = sparse_attention(q, pool, idx, sink, lse=lse).astype(np.float64)
    assert np.isnan(o[1, 5]).all() and np.isnan(lse[1, 5])
    mask = np.ones((N, H), bool)
    mask[1, 5] = False
    assert np.isfinite(o[mask]).all() and np.isfinite(lse[mask]).all()
    q2 = q.copy()
    q2[1, 5] = 0
    want = sparse_attention(q2, pool, idx, sink).astype(np.float64)
    np.testing.assert_array_equal(o[mask], want[mask])


def test_lse_merges_partial_attentions(rng):
    """The docstring's rule: parts over disjoint slot sets computed with sink = -inf merge into the
    whole, with the sink entering once."""
    N, H, K, P = 3, 8, 60, 100
    q, pool, idx, sink = make(rng, N, H, K, P, invalid=0.0)
    idx[2, 30:] = -1  # the second part of row 2 is empty
    whole = sparse_attention(q, pool, idx, sink).astype(np.float64)
    no_sink = np.full(H, -np.inf, np.float32)
    parts = []
    for sl in (slice(0, 30), slice(30, K)):
        lse = np.empty((N, H), np.float32)
        o = sparse_attention(q, pool, np.ascontiguousarray(idx[:, sl]), no_sink, lse=lse).astype(np.float64)
        parts.append((o, lse.astype(np.float64)))
    top = np.maximum(parts[0][1], parts[1][1])
    w = [np.exp(lse - top) for _, lse in parts]
    num = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    merged = num / (sum(w) + np.exp(sink.astype(np.float64) - top))[..., None]
    np.testing.assert_allclose(merged, whole, rtol=2e-2, atol=2e-3)


# -- bad input -------------------------------------------------------------------------------------


def _args(rng):
    q, pool, idx, sink = make(rng, 2, 4, 8, 16)
    return dict(q=q, kv=pool, indices=idx, sink=sink)


def _call(a, **kw):
    return sparse_attention(a["q"], a["kv"], a["indices"], a["sink"], **kw)


BAD = [
    (lambda a: a.update(q=a["q"].astype(np.float32)), {}, TypeError, "q"),
    (lambda a: a.update(q=a["q"][:, :, :256]), {}, ValueError, "q"),
    (lambda a: a.update(q=a["q"][0]), {}, ValueError, "q"),
    (lambda a: a.update(q=np.zeros((2, 129, 512), BFLOAT16)), {}, ValueError, "H=129"),
    (lambda a: a.update(q=np.zeros((2, 0, 512), BFLOAT16), sink=np.zeros(0, np.float32)), {}, ValueError, "H=0"),
    (lambda a: a.update(kv=a["kv"][:, :448]), {}, ValueError, "kv"),
    (lambda a: a.update(kv=a["kv"].astype(np.float32)), {}, ValueError, "kv"),
    (lambda a: a.update(kv=a["kv"][None]), {}, ValueError, "kv"),
    (lambda a: a.update(kv=pack_kv_fp8(a["kv"])), {}, ValueError, "kv_format='fp8'"),
    (lambda a: None, {"kv_format": "fp8"}, ValueError, "kv"),
    (lambda a: a.update(kv=pack_kv_fp8(a["kv"])[:, :576]), {"kv_format": "fp8"}, ValueError, "584"),
    (lambda a: None, {"kv_format": "int4"}, ValueError, "kv_format"),
    (lambda a: a.update(indices=a["indices"].astype(np.int64)), {}, TypeError, "indices"),
    (lambda a: a.update(indices=a["indices"][:1]), {}, ValueError, "indices"),
    (lambda a: a.update(indices=a["indices"][:, :0]), {}, ValueError, "K=0"),
    (lambda a: a.update(indices=a["indices"][0]), {}, ValueError, "indices"),
    (lambda a: a["indices"].__setitem__((1, 3), 16), {}, ValueError, "indices"),
    (lambda a: a["indices"].__setitem__((0, 0), -2), {}, ValueError, "indices"),
    (lambda a: a.update(sink=a["sink"][:3]), {}, ValueError, "sink"),
    (lambda a: a.update(sink=a["sink"].astype(np.float64)), {}, TypeError, "sink"),
    (lambda a: a.update(sink=None), {}, TypeError, "sink"),
    (lambda a: None, {"scale": 0.0}, ValueError, "scale"),
    (lambda a: None, {"scale": float("nan")}, ValueError, "scale"),
    (lambda a: None, {"scale": "big"}, TypeError, "scale"),
    (lambda a: None, {"positions": np.zeros(2, np.int32)}, ValueError, "rope"),
    (lambda a: None, {"rope": ds4kern.rope_table(8)}, ValueError, "positions"),
    (lambda a: None, {"positions": np.zeros(3, np.int32), "rope": ds4kern.rope_table(8)}, ValueError, "positions"),
    (lambda a: None, {"positions": np.zeros(2, np.float32), "rope": ds4kern.rope_table(8)}, TypeError, "positions"),
    (lambda a: None, {"positions": np.array([0, 8], np.int32), "rope": ds4kern.rope_table(8)}, ValueError,
     "positions"),
    (lambda a: None, {"positions": np.zeros(2, np.int32), "rope": ds4kern.rope_table(8, dim=32)}, ValueError,
     "rope"),
    (lambda a: None, {"positions": np.zeros(2, np.int32), "rope": (np.zeros((8, 32)),) * 2}, TypeError, "rope"),
    (lambda a: None, {"out": np.zeros((2, 4, 512), np.float32)}, TypeError, "out"),
    (lambda a: None, {"out": np.zeros((2, 4, 256), BFLOAT16)}, ValueError, "out"),
    (lambda a: None, {"out": np.zeros((2, 4, 1024), BFLOAT16)[:, :, ::2]}, ValueError, "out"),
    (lambda a: None, {"lse": np.zeros((2, 4), np.float64)}, TypeError, "lse"),
    (lambda a: None, {"lse": np.zeros((4, 2), np.float32)}, ValueError, "lse"),
    (lambda a: None, {"errors": np.zeros(1, np.int32)}, TypeError, "errors"),
]


@pytest.mark.parametrize("edit,kw,exc,word", BAD, ids=[f"{i}-{w}" for i, (_, _, _, w) in enumerate(BAD)])
def test_validation(rng, edit, kw, exc, word):
    a = _args(rng)
    edit(a)
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("(", r"\(")):
        _call(a, **kw)


def test_strided_pool_and_empty_rows(rng):
    q, pool, idx, sink = make(rng, 2, 4, 8, 16)
    wide = np.zeros((16, 1024), BFLOAT16)
    wide[:, :512] = pool
    o = sparse_attention(q, wide[:, :512], idx, sink)
    np.testing.assert_array_equal(o, sparse_attention(q, pool, idx, sink))
    empty = sparse_attention(q[:0], pool, idx[:0], sink)
    assert empty.shape == (0, 4, 512)


# -- FP8 rows ------------------------------------------------------------------------------------


def brute_exponent(amax: float) -> int:
    if amax == 0:
        return -126
    k = -200
    while Fraction(amax) > 448 * Fraction(2) ** k:
        k += 1
    return max(k, -126)


def test_tile_exponent_exact(rng):
    vals = [0.0, 448.0, 448.0 * 2 ** -3, 448.0 * 2 ** 7, 449.0, 1.0, 1.75, 1.7578125, 2.0 ** -133, 2.0 ** -126,
            3.3895e38, 1e-30]
    vals += list(np.abs(rng.standard_normal(200)) * 2.0 ** rng.integers(-40, 40, 200))
    amax = np.array(vals, np.float32).astype(BFLOAT16).astype(np.float64)  # bf16 amax values
    got = tile_exponents(amax)
    want = [brute_exponent(float(a)) for a in amax]
    np.testing.assert_array_equal(got, want)


def test_e4m3_encoder_matches_ml_dtypes(rng):
    x = np.concatenate([rng.uniform(-448, 448, 20000),
                        rng.uniform(-1, 1, 20000) * 2.0 ** rng.integers(-12, 9, 20000)])
    codes = np.arange(256, dtype=np.uint8)
    exact = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = np.isfinite(exact)
    grid = np.unique(np.abs(exact[finite]))
    mids = (grid[:-1] + grid[1:]) / 2  # ties: to even
    x = np.concatenate([x, mids, -mids, exact[finite]])
    np.testing.assert_array_equal(encode_e4m3(x), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert (encode_e4m3(np.array([np.nan, np.inf, -np.inf, 449.0])) == 0x7F).all()


def test_pack_layout_and_round_trip(rng):
    P = 64
    kv = (3 * rng.standard_normal((P, 512)) * 2.0 ** rng.integers(-20, 20, (P, 1))).astype(BFLOAT16)
    kv[0, :64] = 0                                   # zero tile
    kv[1, :64] = np.float32(2.0 ** -130)              # tiny (bf16 subnormal) tile
    kv[2, 64:128] = 448.0                            # amax exactly at 448 * 2^0
    kv[2, 64] = -448.0
    kv[3, 128:192] = np.float32(1e-3)                 # values far below amax in one tile
    kv[3, 130] = 1000.0
    kv[4, 5] = np.nan
    kv[4, 6] = np.inf
    packed = pack_kv_fp8(kv)
    assert packed.dtype == np.uint8 and packed.shape == (P, 584)
    assert (packed[:, 583] == 0).all()
    np.testing.assert_array_equal(packed[:, 448:576].view(BFLOAT16), kv[:, 448:])  # rope bytes as stored
    x = kv.astype(np.float64)
    amax = np.where(np.isfinite(x[:, :448]), np.abs(x[:, :448]), 0).reshape(P, 7, 64).max(axis=2)
    want_k = np.array([[brute_exponent(float(a)) for a in row] for row in amax])
    np.testing.assert_array_equal(packed[:, 576:583].astype(np.int64) - 127, want_k)
    assert packed[0, 576] == 1 and packed[2, 577] == 127
    np.testing.assert_array_equal(packed[2, 64:128], np.where(kv[2, 64:128] < 0, 0xFE, 0x7E))  # +-448 exact
    assert packed[4, 5] == 0x7F and packed[4, 6] == 0x7F
    back = decode_fp8_independent(packed)
    scale = np.ldexp(1.0, want_k)[:, :, None]
    err = np.abs(back[:, :448] - x[:, :448]).reshape(P, 7, 64)
    bound = np.maximum(np.abs(x[:, :448]).reshape(P, 7, 64) * 2.0 ** -4, scale * 2.0 ** -10)
    fin = np.isfinite(x[:, :448]).reshape(P, 7, 64)
    assert (err[fin] <= bound[fin]).all()
    assert (back[0, :64] == 0).all()
    assert (back[3, 128:192][x[3, 128:192] != 1000] == 0).all()  # below half an e4m3 step of scale 4: zero
    un = unpack_kv_fp8(packed)
    assert un.dtype == BFLOAT16 and un.shape == (P, 512)
    finmask = fin.reshape(P, 448)
    np.testing.assert_array_equal(un.astype(np.float64)[:, :448][finmask], back[:, :448][finmask])  # exact in bf16
    np.testing.assert_array_equal(un[:, 448:], kv[:, 448:])
    assert np.isnan(un[4, 5].astype(np.float32)) and np.isnan(un[4, 6].astype(np.float32))
    np.testing.assert_array_equal(reference_pack_kv_fp8(un[5:]), pack_kv_fp8(un[5:]))  # re-pack is stable


def test_pack_validation():
    with pytest.raises(ValueError, match="kv"):
        pack_kv_fp8(np.zeros((3, 512), np.float32))
    with pytest.raises(ValueError, match="packed"):
        unpack_kv_fp8(np.zeros((3, 583), np.uint8))
    with pytest.raises(ValueError, match="out"):
        pack_kv_fp8(np.zeros((3, 512), BFLOAT16), out=np.zeros((3, 583), np.uint8))


# -- explain, rule, scratch -------------------------------------------------------------------------


def test_explain_numpy(rng):
    q, pool, idx, sink = make(rng, 3, 16, 100, 200)
    cos, sin = ds4kern.rope_table(64)
    d = ds4kern.explain(OP, q, pool, idx, sink, positions=np.zeros(3, np.int32), rope=(cos, sin),
                        lse=np.empty((3, 16), np.float32))
    assert d.chosen.name == "reference"
    p = d.problem
    assert (p.rows_bucket, p.heads, p.slots_bucket, p.kv_format, p.rope, p.lse, p.kv_align) == \
        (4, 16, 128, "bf16", True, True, 16)
    assert "reference" in str(d)
    with pytest.raises(ValueError, match="indices"):
        ds4kern.explain(OP, q, pool, idx[:, :0], sink)


def _problem(N, H, K, fmt="bf16", smem=232448):
    return SparseAttentionProblem("cuda", N, H, K, fmt, False, False, 16, smem)


@pytest.mark.parametrize("N,H,K,want", [
    (1, 64, 1024, "split_k"), (8, 128, 2048, "split_k"), (64, 64, 1024, "head_batched"),
    (256, 128, 2048, "head_batched"), (4, 64, 64, "head_batched"), (64, 1, 1024, "naive"),
])
def test_rule(N, H, K, want):
    ok = frozenset({"naive", "head_batched", "split_k"})
    assert rule.rule(_problem(N, H, K), ok)[0] == want
    assert rule.rule(_problem(N, H, K), frozenset({"naive"}))[0] == "naive"


def test_smem_fits_and_split_plan():
    # every instantiated tile fits an H100 block (227 kB); an A100 (163 kB) still gets a tile
    for H in (1, 16, 17, 32, 64, 128):
        for fp8 in (False, True):
            assert kernels.kv_tiles_that_fit(H, fp8, 232448), (H, fp8)
            assert kernels.kv_tiles_that_fit(H, fp8, 166912), (H, fp8)
    assert kernels.head_batched_smem(4, 64, False) <= 232448 and kernels.head_batched_smem(4, 64, True) <= 232448
    for N, H, K, tile in [(1, 64, 640, 32), (1, 128, 1152, 32), (8, 64, 8192, 64), (256, 64, 640, 32), (3, 8, 1, 64)]:
        splits, chunk = split_k_plan(N, H, K, tile, 132)
        assert chunk % tile == 0 and (splits - 1) * chunk < K <= splits * chunk  # none empty, all covered
        assert splits <= -(-K // tile)
        assert split_k_scratch_bytes(N, H, splits) == N * H * splits * 514 * 4
    assert split_k_plan(1, 64, 640, 32, 132) == (20, 32)
    assert split_k_plan(256, 64, 640, 32, 132) == (1, 640)


def test_cuda_constants_mirrored():
    fam = kernels.NAIVE.source
    assert int(source_define(fam, "DS4_SA_WARPS")) == kernels.WARPS
    assert int(source_define(fam, "DS4_SA_FP8_ROW")) == 584
    assert int(source_define(fam, "DS4_SA_DIM")) == 512
    assert int(source_define(fam, "DS4_SA_NOPE")) == 448


# -- property test ---------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 4), H=st.sampled_from([1, 3, 8, 16]), K=st.integers(1, 70), P=st.integers(1, 90),
       fmt=st.sampled_from(["bf16", "fp8"]), invalid=st.sampled_from([0.0, 0.3, 1.0]),
       qscale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2 ** 31))
def test_property_reference_vs_dense(N, H, K, P, fmt, invalid, qscale, seed):
    rng = np.random.default_rng(seed)
    q, pool, idx, sink = make(rng, N, H, K, P, fmt, invalid, qscale)
    lse = np.empty((N, H), np.float32)
    o = sparse_attention(q, pool, idx, sink, kv_format=fmt, lse=lse)
    want, wlse = dense(q, pool, idx, sink, 512 ** -0.5, fmt)
    bf16_close(o, want)
    np.testing.assert_allclose(lse, wlse, rtol=1e-6, atol=1e-6)
