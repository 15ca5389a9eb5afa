"""indexer_topk on the reference backend: against an independent dense float64 formulation (one
einsum, keys decoded with ml_dtypes, a stable sort), contiguous and paged keys (shuffled pages)
giving the same answer, fp8 keys (every code), edge lengths, both token -> sequence mappings,
validation errors naming the argument, the near-tie checker, explain, the rule, the mma plan and
the CUDA constants' Python mirrors."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from indexer_cases import decode_e4m3, dense_logits, dense_topk, e4m3_codes, kwargs, make_case, to_paged

import ds4kern
import ds4kern.ops.indexer  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.kernels import source_define
from ds4kern.ops.indexer import (check_topk, indexer_topk, kernels, mma_plan, reference_indexer_logits, rule,
                                 variants)
from ds4kern.ops.indexer.api import IndexerProblem

OP = "indexer_topk"


def run(case, k, **kw):
    return indexer_topk(case["q"], case["w"], case["keys"], k, **kwargs(case), **kw)


def check_against_dense(case, k):
    idx, logits = run(case, k, return_logits=True)
    want = dense_logits(case)
    C = want.shape[1]
    assert idx.dtype == np.int32 and idx.shape == (case["q"].shape[0], k)
    assert logits.dtype == np.float32
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isneginf(logits[:, :C]), ~fin)
    scale = np.abs(want[fin]).max() if fin.any() else 1.0
    np.testing.assert_allclose(logits[:, :C][fin], want[fin], rtol=1e-6, atol=1e-9 * scale)
    assert np.isneginf(logits[:, C:]).all()  # paged: columns past the contiguous C are beyond every length
    np.testing.assert_array_equal(idx, dense_topk(want, k, case["lengths"]))
    return idx, logits


# -- against the dense formulation -------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["decode", "shared"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("T,C,k", [(1, 1, 1), (1, 300, 16), (4, 300, 7), (4, 64, 100), (3, 129, 2048)])
def test_reference_matches_dense(rng, T, C, k, fmt, paged, shared):
    check_against_dense(make_case(rng, T, C, k, fmt, paged, shared), k)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("shared", [False, True], ids=["decode", "shared"])
def test_contiguous_equals_shuffled_pages(rng, fmt, shared):
    case = make_case(rng, 4, 333, 20, fmt, shared=shared)
    paged = to_paged(rng, case)
    assert not (paged["block_table"][paged["block_table"] >= 0] == np.arange((paged["block_table"] >= 0).sum())).all()
    i0, l0 = run(case, 20, return_logits=True)
    i1, l1 = run(paged, 20, return_logits=True)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(l1[:, :333], l0)  # the same float64 sums: bit for bit
    assert np.isneginf(l1[:, 333:]).all()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_lengths_zero_short_and_full(rng, paged):
    T, C, k = 4, 200, 50
    case = make_case(rng, T, C, k, lengths=[0, 3, C, k], paged=paged)
    idx, logits = run(case, k, return_logits=True)
    assert (idx[0] == -1).all() and np.isneginf(logits[0]).all()
    assert sorted(idx[1, :3]) == [0, 1, 2] and (idx[1, 3:] == -1).all()
    assert (idx[2] >= 0).all() and np.isfinite(logits[2, :C]).all()
    assert sorted(idx[3]) == list(range(k))  # exactly k columns: all of them, ordered
    s = logits[3][idx[3]]
    assert (np.diff(s) <= 0).all()


def test_shared_keys_prefill_mapping(rng):
    """B == 1: every token reads sequence 0, with its own causal length (pos + 1) // 4."""
    T, C = 6, 40
    case = make_case(rng, T, C, 8, shared=True, lengths=(np.arange(150, 150 + T) + 1) // 4)
    idx, logits = run(case, 8, return_logits=True)
    for t in range(T):  # token t alone, as a decode query over the same sequence
        one = dict(case, q=case["q"][t:t + 1], w=case["w"][t:t + 1], lengths=case["lengths"][t:t + 1])
        i1, l1 = run(one, 8, return_logits=True)
        np.testing.assert_array_equal(i1[0], idx[t])
        np.testing.assert_array_equal(l1[0], logits[t])


def test_fp8_every_code(rng):
    """Key column c holds e4m3 code c at dim 0: the logit of a one-hot query is relu(scale * value)."""
    C = 256
    keys = np.zeros((1, C, 128), np.uint8)
    keys[0, :, 0] = np.arange(256)
    scales = np.full((1, C), 0.5, np.float32)
    q = np.zeros((2, 64, 128), BFLOAT16)
    q[0, 3, 0], q[1, 3, 0] = 1.0, -1.0
    w = np.zeros((2, 64), np.float32)
    w[:, 3] = 2.0
    lengths = np.array([C, C], np.int32)
    _, logits = indexer_topk(q, w, keys, 4, lengths=lengths, key_format="fp8", key_scales=scales, return_logits=True)
    v = decode_e4m3(np.arange(256, dtype=np.uint8))
    for t, sign in ((0, 1.0), (1, -1.0)):
        with np.errstate(invalid="ignore"):
            want = 2.0 * np.maximum(sign * v * 0.5, 0.0)
        want[np.isnan(v)] = np.nan
        np.testing.assert_array_equal(logits[t], want.astype(np.float32))


def test_nan_scores_rank_lowest(rng):
    case = make_case(rng, 2, 30, 30, lengths=[30, 30])
    case["q"][1, 5, 7] = np.nan  # every score of token 1 is NaN
    case["keys"][0, 4, 9] = np.nan  # column 4 of token 0 is NaN
    idx, logits = run(case, 30, return_logits=True)
    assert np.isnan(logits[1]).all()
    np.testing.assert_array_equal(idx[1], np.arange(30))  # all NaN: ties, lower column first
    assert np.isnan(logits[0, 4]) and idx[0, -1] == 4


def test_empty_inputs():
    q = np.zeros((0, 64, 128), BFLOAT16)
    out = indexer_topk(q, np.zeros((0, 64), np.float32), np.zeros((0, 5, 128), BFLOAT16), 3,
                       lengths=np.zeros(0, np.int32))
    assert out.shape == (0, 3)
    q1 = np.zeros((2, 64, 128), BFLOAT16)
    idx, logits = indexer_topk(q1, np.ones((2, 64), np.float32), np.zeros((1, 0, 128), BFLOAT16), 3,
                               lengths=np.zeros(2, np.int32), return_logits=True)
    assert (idx == -1).all() and logits.shape == (2, 0)


def test_torch_cpu_and_out(rng):
    torch = pytest.importorskip("torch")
    case = make_case(rng, 3, 100, 10)
    want = run(case, 10)
    out = np.full((3, 10), 7, np.int32)
    got = run(case, 10, out=out)
    assert got is out
    np.testing.assert_array_equal(out, want)
    tq = torch.from_numpy(case["q"].view(np.uint16)).view(torch.bfloat16)
    tk = torch.from_numpy(case["keys"].view(np.uint16)).view(torch.bfloat16)
    got_t = indexer_topk(tq, torch.from_numpy(case["w"]), tk, 10, lengths=torch.from_numpy(case["lengths"]))
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_array_equal(got_t.numpy(), want)


# -- bad input -------------------------------------------------------------------------------------


def _base(rng, fmt="bf16", paged=False, T=2):
    return make_case(rng, T, 130, 4, fmt, paged, lengths=[130, 70][:T])


def _call(c, k=4, **kw):
    args = dict(kwargs(c))
    args.update(kw)
    return indexer_topk(c["q"], c["w"], c["keys"], k, **args)


def _set(key, value):
    def edit(c):
        c[key] = value(c) if callable(value) else value
    return edit


BAD = [
    (_set("q", lambda c: c["q"].astype(np.float32)), {}, TypeError, "q_idx must be bfloat16"),
    (_set("q", lambda c: c["q"][:, :32]), {}, ValueError, r"q_idx must have shape \[T, 64, 128\]"),
    (_set("q", lambda c: np.zeros((2, 64, 64), BFLOAT16)), {}, ValueError, "q_idx.*D=128"),
    (_set("q", lambda c: c["q"][0]), {}, ValueError, "q_idx"),
    (_set("w", lambda c: c["w"].astype(np.float64)), {}, TypeError, "w must be float32"),
    (_set("w", lambda c: c["w"][:, :32]), {}, ValueError, r"w must have shape \[2, 64\]"),
    (_set("keys", lambda c: c["keys"].astype(np.float32)), {}, TypeError, "keys must be bfloat16"),
    (_set("keys", lambda c: c["keys"][:, :, :64]), {}, ValueError, r"keys must have shape \[B, C, 128\]"),
    (_set("keys", lambda c: c["keys"][0]), {}, ValueError, "keys must have shape"),
    (_set("keys", lambda c: np.zeros((3, 130, 128), BFLOAT16)), {}, ValueError, "B=3 .*q_idx has T=2"),
    (lambda c: None, {"key_format": "int4"}, ValueError, "key_format"),
    (lambda c: None, {"key_format": "fp8", "key_scales": np.ones((2, 130), np.float32)}, TypeError,
     "keys must be uint8.*key_format='bf16'"),
    (lambda c: None, {"key_scales": np.ones((2, 130), np.float32)}, ValueError, "key_scales is only for"),
    (lambda c: None, {"k": 0}, ValueError, r"k must be in \[1, 2048\]"),
    (lambda c: None, {"k": 2049}, ValueError, r"k must be in \[1, 2048\]"),
    (lambda c: None, {"k": 2.0}, TypeError, "k must be an int"),
    (lambda c: None, {"lengths": np.array([130, 70], np.int16)}, TypeError, "lengths must be int32 or int64"),
    (lambda c: None, {"lengths": np.array([130], np.int32)}, ValueError, r"lengths must have shape \[T\]"),
    (lambda c: None, {"lengths": np.array([131, 70], np.int32)}, ValueError, r"lengths must lie in \[0, C = 130\]"),
    (lambda c: None, {"lengths": np.array([5, -1], np.int64)}, ValueError, r"lengths\[1\] = -1"),
    (lambda c: None, {"lengths": None}, TypeError, "lengths"),
    (lambda c: None, {"out": np.zeros((2, 4), np.int64)}, TypeError, "out must be int32"),
    (lambda c: None, {"out": np.zeros((2, 5), np.int32)}, ValueError, r"out must have shape \[2, 4\]"),
    (lambda c: None, {"out": np.zeros((2, 8), np.int32)[:, ::2]}, ValueError, "out must be C-contiguous"),
    (lambda c: None, {"errors": np.zeros(1, np.int32)}, TypeError, "errors"),
    (lambda c: None, {"return_logits": "yes"}, TypeError, "return_logits"),
]

BAD_FP8 = [
    (lambda c: None, {"key_scales": None}, TypeError, "key_scales .* is required"),
    (lambda c: None, {"key_scales": np.ones((2, 129), np.float32)}, ValueError, r"key_scales must have shape \[2, 130\]"),
    (lambda c: None, {"key_scales": np.ones((2, 130), np.float64)}, TypeError, "key_scales must be float32"),
    (_set("keys", lambda c: c["keys"].view(np.int8)), {}, TypeError, "keys must be uint8"),
    (lambda c: None, {"key_format": "bf16", "key_scales": None}, TypeError, "keys must be bfloat16.*key_format='fp8'"),
]

BAD_PAGED = [
    (lambda c: None, {"block_table": np.zeros((2, 3), np.int64)}, TypeError, "block_table must be int32"),
    (lambda c: None, {"block_table": np.zeros(6, np.int32)}, ValueError, r"block_table must have shape \[B, max_pages\]"),
    (lambda c: None, {"block_table": np.zeros((3, 3), np.int32)}, ValueError, "block_table has B=3"),
    (_set("keys", lambda c: c["keys"][:, :32]), {}, ValueError, r"keys must have shape \[pages, 64, 128\]"),
    (lambda c: c["block_table"].__setitem__((0, 2), -1), {}, ValueError, r"block_table\[0, 2\] = -1"),
    (lambda c: c["block_table"].__setitem__((1, 0), 9), {}, ValueError, r"block_table\[1, 0\] = 9 .*pages = 9"),
    (lambda c: None, {"lengths": np.array([193, 0], np.int32)}, ValueError, r"max_pages \* 64 = 192"),
]


@pytest.mark.parametrize("edit,kw,exc,pattern", BAD, ids=[f"{i}-{p[:24]}" for i, (_, _, _, p) in enumerate(BAD)])
def test_validation(rng, edit, kw, exc, pattern):
    c = _base(rng)
    edit(c)
    with pytest.raises(exc, match=pattern):
        _call(c, **kw)


@pytest.mark.parametrize("edit,kw,exc,pattern", BAD_FP8, ids=[f"{i}-{p[:24]}" for i, (_, _, _, p) in enumerate(BAD_FP8)])
def test_validation_fp8(rng, edit, kw, exc, pattern):
    c = _base(rng, "fp8")
    edit(c)
    with pytest.raises(exc, match=pattern):
        _call(c, **kw)


@pytest.mark.parametrize("edit,kw,exc,pattern", BAD_PAGED,
                         ids=[f"{i}-{p[:24]}" for i, (_, _, _, p) in enumerate(BAD_PAGED)])
def test_validation_paged(rng, edit, kw, exc, pattern):
    c = _base(rng, paged=True)  # C = 130: 3 pages a sequence, a pool of 2 * 3 + 3 pages
    edit(c)
    with pytest.raises(exc, match=pattern):
        _call(c, **kw)


def test_unread_block_table_entries_may_hold_anything(rng):
    c = _base(rng, paged=True)
    want = _call(c)
    bt = c["block_table"].copy()
    bt[1, 2] = 10 ** 6  # token 1 has length 70: its third page is never read
    np.testing.assert_array_equal(_call(c, block_table=bt), want)


# -- the near-tie checker ------------------------------------------------------------------------------


def test_check_topk_accepts_the_reference_and_reports_near_ties():
    L = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                  [1.0, 1.0 + 1e-6, 0.5, 0.2, -np.inf, -np.inf]])
    lengths = np.array([6, 4])
    ref = np.array([[0, 1, 2], [1, 0, 2]], np.int32)
    rep = check_topk(ref, L, lengths, 3, tol=1e-6)
    assert (rep.differ, rep.entries, rep.rows_differ, rep.separated_rows) == (0, 6, 0, 1)
    rep = check_topk(np.array([[0, 1, 2], [0, 1, 2]], np.int32), L, lengths, 3, tol=1e-6)  # a near-tie swap
    assert (rep.differ, rep.rows_differ) == (2, 1) and "2 of 6" in str(rep)


@pytest.mark.parametrize("bad,msg", [
    ([[0, 1, 3], [1, 0, 2]], "left out"),              # column 2 (score 3) missed for 3 (score 2)
    ([[1, 0, 2], [1, 0, 2]], "above place"),           # order
    ([[0, 0, 1], [1, 0, 2]], "duplicate"),
    ([[0, 1, 6], [1, 0, 2]], r"in \[0, 6\)"),
    ([[0, 1, 2], [1, 0, -1]], r"in \[0, 4\)"),         # -1 where a column must be
    ([[0, 1, 2], [1, 0, 2]], "must be -1"),            # checked with k = 3 but a shorter row below
])
def test_check_topk_rejects(bad, msg):
    L = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                  [1.0, 1.0 + 1e-6, 0.5, 0.2, -np.inf, -np.inf]])
    lengths = np.array([6, 4]) if msg != "must be -1" else np.array([6, 2])
    with pytest.raises(AssertionError, match=msg):
        check_topk(np.array(bad, np.int32), L, lengths, 3, tol=1e-6)


def test_check_topk_on_float32_rounding_of_real_logits(rng):
    """The float32 rounding of the reference's own logits is a correct answer with no difference."""
    case = make_case(rng, 4, 500, 64)
    L, mag = reference_indexer_logits(case["q"], case["w"], case["keys"], case["lengths"], magnitude=True)
    idx = run(case, 64)
    rep = check_topk(idx, L, case["lengths"], 64, tol=2.5e-5 * mag)
    assert rep.differ == 0
    # the magnitude bounds every |logit|
    fin = np.isfinite(L)
    assert (np.abs(L) <= mag[:, None] + 1e-9)[fin].all()


# -- explain, rule, plan, mirrors ---------------------------------------------------------------------


def test_explain_numpy(rng):
    case = make_case(rng, 3, 100, 5, "fp8", paged=True)
    d = ds4kern.explain(OP, case["q"], case["w"], case["keys"], 5, **kwargs(case), return_logits=True)
    assert d.chosen.name == "reference"
    p = d.problem
    assert (p.tokens_bucket, p.cols_bucket, p.k_bucket, p.key_format, p.paged, p.shared_keys, p.logits) == \
        (4, 128, 8, "fp8", True, False, True)
    assert "keys=fp8 paged" in str(d)
    with pytest.raises(ValueError, match="lengths"):
        ds4kern.explain(OP, case["q"], case["w"], case["keys"], 5, **dict(kwargs(case), lengths=np.full(3, 999)))


def _problem(T=8, C=262144, k=1024, fmt="fp8", shared=False, smem=232448, cc=90):
    return IndexerProblem("cuda", T, C, k, fmt, False, shared, False, smem, cc)


def test_rule_and_supports():
    ok = frozenset({"naive", "mma"})
    assert rule.rule(_problem(), ok)[0] == "mma"
    assert rule.rule(_problem(), frozenset({"naive"}))[0] == "naive"
    assert rule.rule(IndexerProblem("numpy", 1, 1, 1, "bf16", False, False, False), frozenset({"reference"}))[0] \
        == "reference"
    for fmt in ("bf16", "fp8"):
        for shared in (False, True):
            assert variants._mma_supports(_problem(fmt=fmt, shared=shared)) is None            # H100
            assert variants._mma_supports(_problem(fmt=fmt, shared=shared, smem=166912)) is None  # A100
    assert "shared memory" in variants._mma_supports(_problem(smem=49152))
    assert "sm_80" in variants._mma_supports(_problem(cc=75))


def test_mma_smem_and_plan():
    # the layout of mma.cu's IxLayout: q 272-byte rows, key tiles, fp8 raw stages and scales, reduction, w
    assert kernels.mma_smem(1, False) == 64 * 272 + 2 * 64 * 272 + 4 * 64 * 4 + 64 * 4 == 53504
    assert kernels.mma_smem(2, True) == 2 * 64 * 272 + 64 * 272 + 2 * 8192 + 512 + 2 * 1024 + 2 * 256
    for tg in (1, 2):  # the resident blocks the launch bounds promise fit an H100's 228 KB per SM
        assert kernels.RESIDENT[tg] * (kernels.mma_smem(tg, False) + 1024) <= 228 * 1024
    run_, runs, groups = mma_plan(8, 262144, 1, 132)  # decode B=8, C=262144: about two waves
    assert (run_, runs, groups) == (32, 128, 8)
    assert mma_plan(1, 1, 1, 132) == (1, 1, 1)
    assert mma_plan(4096, 16384, 2, 132) == (256, 1, 2048)
    for T, C, tg in [(1, 7, 1), (3, 8192, 2), (64, 65536, 2), (8, 262144, 1)]:
        run_, runs, groups = mma_plan(T, C, tg, 132)
        tiles = -(-C // 64)
        assert (runs - 1) * run_ < tiles <= runs * run_ and groups == -(-T // tg)


def test_cuda_constants_mirrored():
    for fam in (kernels.NAIVE.source, kernels.MMA.source):
        assert int(source_define(fam, "DS4_IX_HEADS")) == kernels.HEADS
        assert int(source_define(fam, "DS4_IX_DIM")) == kernels.DIM
        assert int(source_define(fam, "DS4_IX_PAGE")) == kernels.PAGE
        assert int(source_define(fam, "DS4_IX_TILE")) == kernels.TILE
        assert int(source_define(fam, "DS4_IX_NAIVE_THREADS")) == kernels.NAIVE_THREADS
        assert int(source_define(fam, "DS4_IX_MMA_WARPS")) == kernels.MMA_WARPS


# -- property test ---------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 5), C=st.integers(1, 200), k=st.sampled_from([1, 2, 7, 64, 300, 2048]),
       fmt=st.sampled_from(["bf16", "fp8"]), paged=st.booleans(), shared=st.booleans(),
       seed=st.integers(0, 2 ** 31))
def test_property_reference_vs_dense(T, C, k, fmt, paged, shared, seed):
    rng = np.random.default_rng(seed)
    check_against_dense(make_case(rng, T, C, k, fmt, paged, shared), k)


def test_e4m3_helpers_agree():
    x = np.linspace(-440, 440, 1001)
    codes = e4m3_codes(x)
    np.testing.assert_array_equal(decode_e4m3(codes), x.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
                                  .astype(np.float64))
