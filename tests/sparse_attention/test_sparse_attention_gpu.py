"""sparse_attention's CUDA variants against the float64 reference, on fresh random inputs.

Every CUDA variant the registry says supports a problem runs with each of its settings
(``Variant.configs``: head_batched / split_k ``kv_tile``); outputs and lse are poisoned (NaN)
first, so an unwritten element fails.  Tolerances against the float64 reference, pool and q
values of order 1: ``o`` within atol = rtol = 1e-2 (bf16 output rounding 2^-9, plus the tensor-core
variants' bf16 softmax weights), ``lse`` within 5e-3 absolute (float32 sums of bf16-rounded
weights).  FP8 pools are compared with the reference decoding the same bytes (dequantisation is
exact), so FP8 adds no tolerance of its own.
"""

import numpy as np
import pytest
from conftest import require_support, supported_variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
import ds4kern.ops.sparse_attention  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.ops.sparse_attention import (pack_kv_fp8, reference_pack_kv_fp8, reference_sparse_attention,
                                          reference_unpack_kv_fp8, sparse_attention, split_k_scratch_bytes,
                                          unpack_kv_fp8)
from ds4kern.ops.sparse_attention.variants import split_plan

pytestmark = pytest.mark.gpu

OP = "sparse_attention"
TOL = dict(rtol=1e-2, atol=1e-2)
LSE_ATOL = 5e-3
MAX_POS = 1 << 16
SCALE = 512 ** -0.5

# (N, H, K): H in {1, 8, 16, 64, 128}, K in {1, 64, 128, 640, 1152, 8192}, N in {1, 3, 8, 64, 256};
# large K only with small N (the float64 reference gathers K x 512 per row), odd K for tails.
CASES = [(1, 1, 1), (3, 8, 64), (8, 16, 128), (1, 64, 640), (64, 64, 640), (3, 128, 1152), (8, 128, 1152),
         (1, 64, 8192), (3, 16, 8192), (256, 8, 128), (256, 64, 128), (64, 128, 64), (1, 128, 1),
         (3, 1, 1152), (8, 64, 129), (64, 16, 1152)]
EXTRAS = [(False, False), (True, True)]  # (inverse RoPE, lse)


def host_inputs(rng, N, H, K, fmt, P=None, invalid=0.1):
    P = P or max(2 * K, 4096)
    q = rng.standard_normal((N, H, 512)).astype(BFLOAT16)
    kv = rng.standard_normal((P, 512)).astype(BFLOAT16)
    idx = rng.integers(0, P, (N, K)).astype(np.int32)
    idx[rng.random((N, K)) < invalid] = -1
    if K > 2:
        idx[:, 1] = idx[:, 2]  # repeated slots
    if N > 1:
        idx[N // 2] = -1  # a row without any valid slot
    sink = rng.standard_normal(H).astype(np.float32)
    pool = reference_pack_kv_fp8(kv) if fmt == "fp8" else kv
    pos = rng.integers(0, MAX_POS, N).astype(np.int64)
    return q, pool, idx, sink, pos


ROPE = None


def rope_tables():
    global ROPE
    if ROPE is None:
        ROPE = ds4kern.rope_table(MAX_POS, theta=160000.0, yarn_factor=16.0, original_max_pos=4096)
    return ROPE


def expected(q, pool, idx, sink, pos, fmt, rope):
    cos, sin = rope_tables()
    return reference_sparse_attention(q, pool, idx, sink, SCALE, fmt, pos if rope else None, cos, sin)


def run(cp, variant, config, q, pool, idx, sink, pos, fmt, rope, with_lse, errors=None, pool_dev=None):
    """One GPU call of ``variant`` with ``config`` bound; outputs poisoned with NaN first."""
    N, H, _ = q.shape
    cos, sin = rope_tables()
    out = cp.full((N, H, 512), np.nan, np.float32).astype(BFLOAT16)
    lse = cp.full((N, H), np.nan, np.float32) if with_lse else None
    kw = dict(kv_format=fmt, out=out, lse=lse, errors=errors)
    if rope:
        kw.update(positions=cp.asarray(pos), rope=(cp.asarray(cos), cp.asarray(sin)))
    args = (cp.asarray(q), pool_dev if pool_dev is not None else cp.asarray(pool), cp.asarray(idx), cp.asarray(sink))
    call = sparse_attention.op.prepare(*args, **kw)
    fn = registry.get(OP, variant).fn
    with call.frame.running():
        fn(call.args, **(config or {}))
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(out).astype(np.float64), None if lse is None else cp.asnumpy(lse)


def settings_for(cp, q, pool, idx, sink, fmt):
    """(variant, config) pairs the registry offers for this problem."""
    args = (cp.asarray(q), cp.asarray(pool), cp.asarray(idx), cp.asarray(sink))
    names = supported_variants(OP, *args, kv_format=fmt)
    d = ds4kern.explain(OP, *args, kv_format=fmt)
    out = []
    for name in names:
        cfgs = registry.get(OP, name).configs_for(d.problem)
        out += [(name, c) for c in cfgs] if cfgs else [(name, None)]
    return out


def check(got, lse, want, wlse, label):
    np.testing.assert_allclose(got, want, err_msg=label, **TOL)
    if lse is not None:
        np.testing.assert_allclose(lse, wlse, rtol=0, atol=LSE_ATOL, err_msg=label)


@pytest.mark.parametrize("rope,with_lse", EXTRAS, ids=["plain", "rope+lse"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("N,H,K", CASES, ids=[f"N{n}-H{h}-K{k}" for n, h, k in CASES])
def test_variants_match_reference(cp, rng, N, H, K, fmt, rope, with_lse):
    q, pool, idx, sink, pos = host_inputs(rng, N, H, K, fmt)
    want, wlse = expected(q, pool, idx, sink, pos, fmt, rope)
    pairs = settings_for(cp, q, pool, idx, sink, fmt)
    assert any(v == "naive" for v, _ in pairs)
    for variant, config in pairs:
        got, lse = run(cp, variant, config, q, pool, idx, sink, pos, fmt, rope, with_lse)
        check(got, lse, want, wlse, f"{variant} {config}")
        if N > 1:
            assert (got[N // 2] == 0).all(), f"{variant} {config}: a row without slots must be zeros"


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_dispatcher_and_torch(cp, rng, fmt):
    N, H, K = 8, 64, 640
    q, pool, idx, sink, _ = host_inputs(rng, N, H, K, fmt)
    want, _ = expected(q, pool, idx, sink, None, fmt, False)
    got = sparse_attention(cp.asarray(q), cp.asarray(pool), cp.asarray(idx), cp.asarray(sink), kv_format=fmt)
    np.testing.assert_allclose(cp.asnumpy(got).astype(np.float64), want, **TOL)
    torch = pytest.importorskip("torch")
    tq = torch.from_dlpack(cp.asarray(q))
    got_t = sparse_attention(tq, torch.from_dlpack(cp.asarray(pool)), torch.from_dlpack(cp.asarray(idx)),
                             torch.from_dlpack(cp.asarray(sink)), kv_format=fmt)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.bfloat16
    np.testing.assert_allclose(got_t.float().cpu().numpy(), want, **TOL)


@pytest.mark.parametrize("fmt,row_bytes", [("bf16", 1040), ("fp8", 592), ("fp8", 600)])
def test_strided_pool(cp, rng, fmt, row_bytes):
    """Pool rows apart by more than a row (fp8: 16-byte multiples and 8-byte multiples)."""
    N, H, K = 8, 16, 200
    q, pool, idx, sink, pos = host_inputs(rng, N, H, K, fmt, P=1000)
    want, wlse = expected(q, pool, idx, sink, pos, fmt, True)
    item = pool.itemsize
    wide = np.zeros((pool.shape[0], row_bytes // item), pool.dtype)
    wide[:, :pool.shape[1]] = pool
    dev = cp.asarray(wide)[:, :pool.shape[1]]
    for variant, config in settings_for(cp, q, pool, idx, sink, fmt):
        got, lse = run(cp, variant, config, q, pool, idx, sink, pos, fmt, True, True, pool_dev=dev)
        check(got, lse, want, wlse, f"{variant} {config}")


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_errors_counter_bad_slots_and_positions(cp, rng, fmt):
    N, H, K, P = 8, 64, 300, 1000
    q, pool, idx, sink, pos = host_inputs(rng, N, H, K, fmt, P=P)
    bad = idx.copy()
    bad[0, 5], bad[3, 7], bad[3, 250], bad[7, 0] = P, P + 123, -2, -(2 ** 31)
    n_bad_slots = 4
    pos_bad = pos.copy()
    pos_bad[2], pos_bad[6] = MAX_POS, -1
    clean = np.where((bad < -1) | (bad >= P), -1, bad)
    pos_ok = np.where((pos_bad < 0) | (pos_bad >= MAX_POS), 0, pos_bad)
    want, wlse = expected(q, pool, clean, sink, pos_ok, fmt, True)
    for variant, config in settings_for(cp, q, pool, idx, sink, fmt):
        errors = cp.zeros(1, np.int32)
        got, lse = run(cp, variant, config, q, pool, bad, sink, pos_bad, fmt, True, True, errors=errors)
        label = f"{variant} {config}"
        assert int(errors[0]) == n_bad_slots + 2, label
        for n in (2, 6):  # bad positions: rope dims NaN, the rest as computed
            assert np.isnan(got[n, :, 448:]).all(), label
        ok = np.ones(N, bool)
        ok[[2, 6]] = False
        check(got[ok], lse[ok], want[ok], wlse[ok], label)
        np.testing.assert_allclose(got[~ok, :, :448], want[~ok, :, :448], err_msg=label, **TOL)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(q, pool, bad, sink, kv_format=fmt)  # the reference raises


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_nan_in_q_stays_in_its_row(cp, rng, fmt):
    N, H, K = 8, 64, 640
    q, pool, idx, sink, pos = host_inputs(rng, N, H, K, fmt)
    q[3, 17, 9] = np.nan
    q2 = q.copy()
    q2[3, 17] = 0
    want, wlse = expected(q2, pool, idx, sink, pos, fmt, True)
    mask = np.ones((N, H), bool)
    mask[3, 17] = False
    for variant, config in settings_for(cp, q, pool, idx, sink, fmt):
        got, lse = run(cp, variant, config, q, pool, idx, sink, pos, fmt, True, True)
        label = f"{variant} {config}"
        assert np.isnan(got[3, 17]).all() and np.isnan(lse[3, 17]), label
        check(got[mask], lse[mask], want[mask], wlse[mask], label)


class _Allocations:
    """Records the size of every memory-pool allocation made inside a ``with`` block."""

    def __init__(self, cp):
        hook_base = cp.cuda.MemoryHook

        class Hook(hook_base):
            name = "sparse_attention_scratch"

            def __init__(self):
                self.sizes = []

            def malloc_preprocess(self, **kw):
                self.sizes.append(int(kw["size"]))

        self.hook = Hook()

    def __enter__(self):
        self.hook.__enter__()
        return self.hook

    def __exit__(self, *exc):
        return self.hook.__exit__(*exc)


@pytest.mark.parametrize("N,H,K", [(1, 64, 640), (8, 128, 1152), (64, 64, 640), (3, 16, 8192)])
def test_scratch_is_the_documented_formula(cp, rng, N, H, K):
    """naive / head_batched allocate nothing (no [N, H, K] scores anywhere); split_k allocates
    exactly N * H * splits * 514 * 4 bytes."""
    q, pool, idx, sink, _ = host_inputs(rng, N, H, K, "bf16")
    args = (cp.asarray(q), cp.asarray(pool), cp.asarray(idx), cp.asarray(sink))
    out = cp.empty((N, H, 512), BFLOAT16)
    lse = cp.empty((N, H), np.float32)
    for variant, config in settings_for(cp, q, pool, idx, sink, "bf16"):
        call = sparse_attention.op.prepare(*args, out=out, lse=lse)
        fn = registry.get(OP, variant).fn
        cp.cuda.get_current_stream().synchronize()
        with _Allocations(cp) as rec:
            fn(call.args, **(config or {}))
            cp.cuda.get_current_stream().synchronize()
        if variant == "split_k":
            splits, _ = split_plan(call.args, config["kv_tile"])
            assert sum(rec.sizes) == split_k_scratch_bytes(N, H, splits), (config, rec.sizes)
        else:
            assert rec.sizes == [], (variant, rec.sizes)


def test_fp8_pack_unpack_gpu_match_reference(cp, rng):
    P = 300
    kv = (rng.standard_normal((P, 512)) * 2.0 ** rng.integers(-30, 30, (P, 1))).astype(BFLOAT16)
    kv[0, :64] = 0
    kv[1, :64] = np.float32(2.0 ** -130)
    kv[2, 64:128] = 448.0
    kv[3, 5], kv[3, 6], kv[3, 7] = np.nan, np.inf, -np.inf
    kv[4, 448:] = np.nan  # rope bytes travel unchanged
    want = reference_pack_kv_fp8(kv)
    got = cp.asnumpy(pack_kv_fp8(cp.asarray(kv)))
    np.testing.assert_array_equal(got, want)
    back = cp.asnumpy(unpack_kv_fp8(cp.asarray(want))).view(np.uint16)
    np.testing.assert_array_equal(back, reference_unpack_kv_fp8(want, dtype=BFLOAT16).view(np.uint16))
    wide = np.zeros((P, 600), np.uint8)  # strided packed rows (8-byte multiples)
    wide[:, :584] = want
    back2 = cp.asnumpy(unpack_kv_fp8(cp.asarray(wide)[:, :584])).view(np.uint16)
    np.testing.assert_array_equal(back2, back)
    # every byte value in every nope position (NaN codes 0x7f and 0xff keep their sign), random scales
    codes = np.empty((256, 584), np.uint8)
    codes[:, :448] = (np.arange(448)[None, :] + np.arange(256)[:, None]) % 256
    codes[:, 448:576] = rng.integers(0, 256, (256, 128))
    codes[:, 576:583] = rng.integers(100, 160, (256, 7))
    codes[:, 583] = 0
    back3 = cp.asnumpy(unpack_kv_fp8(cp.asarray(codes))).view(np.uint16)
    np.testing.assert_array_equal(back3, reference_unpack_kv_fp8(codes, dtype=BFLOAT16).view(np.uint16))


def test_head_batched_support_is_the_registry_s(cp, rng):
    q, pool, idx, sink, _ = host_inputs(rng, 2, 128, 64, "fp8")
    require_support(OP, "head_batched", cp.asarray(q), cp.asarray(pool), cp.asarray(idx), cp.asarray(sink),
                    kv_format="fp8")
    got = sparse_attention(cp.asarray(q), cp.asarray(pool), cp.asarray(idx), cp.asarray(sink), kv_format="fp8",
                           variant="head_batched")
    want, _ = expected(q, pool, idx, sink, None, "fp8", False)
    np.testing.assert_allclose(cp.asnumpy(got).astype(np.float64), want, **TOL)


@settings(derandomize=True, deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 40), H=st.sampled_from([1, 2, 8, 16, 20, 33, 64, 100, 128]), K=st.integers(1, 700),
       fmt=st.sampled_from(["bf16", "fp8"]), invalid=st.sampled_from([0.0, 0.2, 0.9, 1.0]),
       rope=st.booleans(), with_lse=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_property_variants_vs_reference(cp, N, H, K, fmt, invalid, rope, with_lse, seed):
    rng = np.random.default_rng(seed)
    q, pool, idx, sink, pos = host_inputs(rng, N, H, K, fmt, P=max(K, 64), invalid=invalid)
    want, wlse = expected(q, pool, idx, sink, pos, fmt, rope)
    for variant, config in settings_for(cp, q, pool, idx, sink, fmt):
        got, lse = run(cp, variant, config, q, pool, idx, sink, pos, fmt, rope, with_lse)
        check(got, lse, want, wlse, f"{variant} {config}")
