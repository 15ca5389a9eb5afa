"""indexer_topk's CUDA variants against the float64 reference, on fresh random inputs.

Every CUDA variant the registry says supports a problem runs; outputs are poisoned first (indices
7777, logits NaN), so an unwritten element fails.

Tolerances.  The GPU logits are float32 sums of exact bf16 x bf16 (or bf16 x e4m3) products: per
head a chain of 128 additions, one multiply by the key's scale, one by w[t, h], then 64 heads
summed.  Recursive summation errs by at most gamma_n sum |terms| (gamma_n ~ n 2^-24), so every
logit of row t is within (128 + 64 + 2) 2^-24 ~ 1.2e-5 of ``mag[t] = max_c sum_h |w| sum_d |q k|``;
doubled (2.5e-5) for tensor cores whose accumulation may truncate rather than round.  Indices are
checked with ``check_topk`` at that tolerance: a correct top-k up to near-ties, with the count of
places that differ from the exact reference through near-ties printed and required to be small
(at most 1% of the selected places, plus 4).
"""

import numpy as np
import pytest
from conftest import require_support, supported_variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from indexer_cases import decode_e4m3, kwargs, make_case

import ds4kern
import ds4kern.ops.indexer  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.ops.indexer import check_topk, indexer_topk, reference_indexer_logits

pytestmark = pytest.mark.gpu

OP = "indexer_topk"
LOGIT_RTOL = 2.5e-5
NEAR_TIE_FRACTION = 0.01
POISON = 7777

# (T, C, k, shared): C in {1, 7, 512, 8192, 65536}, k in {1, 512, 2048}, T in {1, 4, 64}; large C
# with many tokens only where they share their keys (the float64 reference and host memory).
CASES = [(1, 1, 1, False), (1, 7, 512, False), (4, 7, 1, True), (4, 512, 512, False), (64, 512, 1, True),
         (64, 512, 2048, False), (1, 8192, 2048, False), (4, 8192, 512, True), (64, 8192, 512, False),
         (64, 8192, 2048, True), (1, 65536, 2048, False), (4, 65536, 512, False), (64, 65536, 1, True),
         (64, 65536, 512, True)]


def dev(cp, case):
    """Device copies of a case's arrays (None stays None)."""
    return {k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in case.items() if k != "contiguous"}


def run(cp, variant, d, k, return_logits, errors=None):
    """One GPU call of ``variant``; outputs poisoned first.  Returns host (indices, logits or None)."""
    T = d["q"].shape[0]
    out = cp.full((T, k), POISON, np.int32)
    call = indexer_topk.op.prepare(d["q"], d["w"], d["keys"], k, **kwargs(d), return_logits=return_logits, out=out,
                                   errors=errors)
    if return_logits:
        call.args.logits[...] = np.nan
    fn = registry.get(OP, variant).fn
    with call.frame.running():
        fn(call.args)
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(out), (cp.asnumpy(call.args.logits) if return_logits else None)


def expected(case):
    """(float64 logits, per-row magnitude) of the reference."""
    return reference_indexer_logits(case["q"], case["w"], case["keys"], case["lengths"], case["key_format"],
                                    case["key_scales"], case["block_table"], magnitude=True)


def check_logits(got, want, mag, label):
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{label}: -inf pattern")
    err = np.where(fin, np.abs(got.astype(np.float64) - np.where(fin, want, 0.0)), 0.0)
    bound = LOGIT_RTOL * mag[:, None]
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (f"{label}: logit [{worst[0]}, {worst[1]}] off by {err[worst]:.3g}, bound "
                                  f"{bound[worst[0], 0]:.3g}")


def check_indices(got, want, mag, case, k, label):
    rep = check_topk(got, want, case["lengths"], k, LOGIT_RTOL * mag)
    print(f"{label}: {rep}")
    assert rep.differ <= NEAR_TIE_FRACTION * rep.entries + 4, f"{label}: too many near-tie differences: {rep}"
    return rep


def variants_for(cp, d, k):
    names = supported_variants(OP, d["q"], d["w"], d["keys"], k, **kwargs(d))
    assert "naive" in names
    return names


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("T,C,k,shared", CASES, ids=[f"T{t}-C{c}-k{k}-{'shared' if s else 'decode'}"
                                                      for t, c, k, s in CASES])
def test_variants_match_reference(cp, rng, T, C, k, shared, fmt, layout):
    case = make_case(rng, T, C, k, fmt, layout == "paged", shared)
    want, mag = expected(case)
    d = dev(cp, case)
    for variant in variants_for(cp, d, k):
        label = f"{variant} T={T} C={C} k={k} {fmt} {layout} {'shared' if shared else 'decode'}"
        idx, logits = run(cp, variant, d, k, return_logits=True)
        check_logits(logits, want, mag, label)
        check_indices(idx, want, mag, case, k, label)
        idx2, _ = run(cp, variant, d, k, return_logits=False)  # scratch logits: the same selection
        np.testing.assert_array_equal(idx2, idx, err_msg=f"{label}: scratch vs returned logits")


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_largest_decode(cp, rng, fmt):
    """Decode at a 1M-token context: B = 8 sequences of C = 262144 compressed keys, k = 1024."""
    T, C, k = 8, 262144, 1024
    case = make_case(rng, T, C, k, fmt, lengths=[C, C - 1, 200000, 1023, 0, 77777, C, 131072])
    want, mag = expected(case)
    d = dev(cp, case)
    for variant in variants_for(cp, d, k):
        label = f"{variant} largest {fmt}"
        idx, logits = run(cp, variant, d, k, return_logits=True)
        check_logits(logits, want, mag, label)
        check_indices(idx, want, mag, case, k, label)


def test_every_e4m3_code(cp):
    """Column c holds code c at dim 0; a one-hot query of +1 / -1 makes the logits relu(+-value *
    scale) exactly: every code through each variant's conversion, NaN codes included."""
    C = 256
    keys = np.zeros((1, C, 128), np.uint8)
    keys[0, :, 0] = np.arange(256)
    scales = np.full((1, C), 0.25, np.float32)
    q = np.zeros((2, 64, 128), BFLOAT16)
    q[0, 9, 0], q[1, 9, 0] = 1.0, -1.0
    w = np.zeros((2, 64), np.float32)
    w[:, 9] = 4.0
    v = decode_e4m3(np.arange(256, dtype=np.uint8))
    want = np.stack([np.where(np.isnan(v), np.nan, 4.0 * np.maximum(s * v * 0.25, 0.0)) for s in (1.0, -1.0)])
    case = dict(q=q, w=w, keys=keys, key_scales=scales, lengths=np.array([C, C], np.int32), key_format="fp8",
                block_table=None)
    d = dev(cp, case)
    for variant in variants_for(cp, d, 4):
        _, logits = run(cp, variant, d, 4, return_logits=True)
        np.testing.assert_array_equal(logits, want.astype(np.float32), err_msg=variant)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("shared", [False, True], ids=["decode", "shared"])
def test_errors_counter_bad_lengths_and_pages(cp, rng, fmt, shared):
    """Lengths outside [0, C] are clamped and counted once per token; a bad page entry below a
    token's length makes its 64 columns -inf and is counted once per (token, page); entries beyond
    every length are never read."""
    T, C, k = 6, 640, 100
    case = make_case(rng, T, C, k, fmt, paged=True, shared=shared, lengths=[640, 300, 64, 0, 500, 129])
    bt = case["block_table"]
    pages = case["keys"].shape[0]
    bad_lengths = case["lengths"].copy()
    bad_lengths[3] = -5      # clamped to 0
    bad_lengths[0] = C + 9   # clamped to C
    bt_bad = bt.copy()
    b_of = (lambda t: t) if not shared else (lambda t: 0)
    bt_bad[b_of(1), 2] = -1          # columns 128 .. 191 of token 1 (length 300)
    bt_bad[b_of(4), 7] = pages + 5   # columns 448 .. 511 of token 4 (length 500)
    if not shared:
        bt_bad[5, 9] = -7            # beyond token 5's length 129: never read, not counted
    clean = dict(case, block_table=bt)
    want, mag = expected(clean)
    bad_cols = np.zeros_like(want, bool)
    n_bad_pages = 0
    for t in range(T):
        n = int(case["lengths"][t])
        for j in range(-(-n // 64)):
            e = bt_bad[b_of(t), j]
            if e < 0 or e >= pages:
                bad_cols[t, 64 * j:min(n, 64 * j + 64)] = True
                n_bad_pages += 1
    assert n_bad_pages == (2 if not shared else 6)  # shared: page 2 by tokens 0, 1, 4, 5; page 7 by 0, 4
    d = dev(cp, dict(case, lengths=bad_lengths, block_table=bt_bad))
    for variant in variants_for(cp, d, k):
        errors = cp.zeros(1, np.int32)
        idx, logits = run(cp, variant, d, k, return_logits=True, errors=errors)
        label = f"{variant} {fmt} {'shared' if shared else 'decode'}"
        assert int(errors[0]) == 2 + n_bad_pages, label
        assert np.isneginf(logits[bad_cols]).all(), label
        check_logits(np.where(bad_cols, want, logits), want, mag, label)
        bad_sel = np.isin(idx, np.flatnonzero(bad_cols[1]))
        assert not bad_sel[1].any()  # token 1 has >= k finite columns: -inf ones never chosen
    with pytest.raises(ValueError, match="block_table"):
        indexer_topk(case["q"], case["w"], case["keys"], k, **dict(kwargs(case), block_table=bt_bad))


def test_dispatcher_cupy_and_torch(cp, rng):
    T, C, k = 4, 3000, 512
    case = make_case(rng, T, C, k, "fp8", paged=True)
    want, mag = expected(case)
    d = dev(cp, case)
    d_ = ds4kern.explain(OP, d["q"], d["w"], d["keys"], k, **kwargs(d))
    print(d_)
    idx = indexer_topk(d["q"], d["w"], d["keys"], k, **kwargs(d))
    check_indices(cp.asnumpy(idx), want, mag, case, k, "dispatch")
    torch = pytest.importorskip("torch")
    td = {key: (torch.from_dlpack(v) if hasattr(v, "__cuda_array_interface__") else v) for key, v in d.items()}
    got, logits = indexer_topk(td["q"], td["w"], td["keys"], k, **kwargs(td), return_logits=True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32 and logits.dtype == torch.float32
    check_indices(got.cpu().numpy(), want, mag, case, k, "dispatch torch")
    check_logits(logits.cpu().numpy(), want, mag, "dispatch torch")


def test_mma_support_is_the_registry_s(cp, rng):
    case = make_case(rng, 2, 100, 10)
    d = dev(cp, case)
    require_support(OP, "mma", d["q"], d["w"], d["keys"], 10, **kwargs(d))
    got = indexer_topk(d["q"], d["w"], d["keys"], 10, **kwargs(d), variant="mma")
    want, mag = expected(case)
    check_indices(cp.asnumpy(got), want, mag, case, 10, "mma forced")


@settings(derandomize=True, deadline=None, max_examples=30,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 12), C=st.integers(1, 3000), k=st.sampled_from([1, 3, 64, 512, 1000, 2048]),
       fmt=st.sampled_from(["bf16", "fp8"]), paged=st.booleans(), shared=st.booleans(), logits=st.booleans(),
       seed=st.integers(0, 2 ** 31))
def test_property_every_supported_variant(cp, T, C, k, fmt, paged, shared, logits, seed):
    rng = np.random.default_rng(seed)
    case = make_case(rng, T, C, k, fmt, paged, shared)
    want, mag = expected(case)
    d = dev(cp, case)
    for variant in variants_for(cp, d, k):
        label = f"{variant} T={T} C={C} k={k} {fmt} paged={paged} shared={shared}"
        idx, lg = run(cp, variant, d, k, return_logits=logits)
        if logits:
            check_logits(lg, want, mag, label)
        check_indices(idx, want, mag, case, k, label)
