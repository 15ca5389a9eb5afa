"""moe_permute / moe_unpermute's CUDA variants against the reference, on fresh random inputs.

Permutation arrays must equal the reference exactly; x_perm rows below N equal x's rows bit for
bit and rows from N on keep their poison; unpermute equals the reference exactly (both sum in
float32 in the fixed order j = 0 .. k-1 with every step rounded).  Every CUDA variant the
registry says supports a problem runs; outputs are poisoned first, so an unwritten element fails.
"""

import numpy as np
import pytest
from conftest import supported_variants
from moe_cases import DTYPES, make_indices, make_rows

import ds4kern.ops.moe  # noqa: F401  (registers the ops)
from ds4kern.core.registry import registry
from ds4kern.ops.moe import (MoePermutation, moe_permute, moe_unpermute, reference_permutation,
                             reference_unpermute)

pytestmark = pytest.mark.gpu

POISON_INT = -7


def poisoned_perm(cp, T, k, E, x=None):
    """A MoePermutation of poisoned device buffers (x_perm: NaN in x's dtype)."""
    x_perm = None if x is None else cp.full((T * k, x.shape[1]), np.nan, np.float32).astype(x.dtype)
    return MoePermutation(cp.full(E, POISON_INT, np.int32), cp.full(E + 1, POISON_INT, np.int32),
                          cp.full(T * k, POISON_INT, np.int32), cp.full((T, k), POISON_INT, np.int32), x_perm, T, k, E)


def run(op, variant, *args, **kw):
    """One call of ``variant`` after the op's own validation."""
    import cupy as cp

    fn = moe_permute if op == "moe_permute" else moe_unpermute
    call = fn.op.prepare(*args, **kw)
    if not call.skip:
        with call.frame.running():
            registry.get(op, variant).fn(call.args)
    cp.cuda.get_current_stream().synchronize()
    return call.results


def check_permute(cp, idx, E, x_host=None, x_dev=None, label="", need=()):
    """Every supported CUDA variant against the reference; returns the variants run."""
    T, k = idx.shape
    want = reference_permutation(idx, E)
    d_idx = cp.asarray(idx)
    if x_host is not None and x_dev is None:
        x_dev = cp.asarray(x_host)
    names = supported_variants("moe_permute", d_idx, E, x_dev)
    assert set(need) <= set(names), (names, label)
    for v in names:
        out = poisoned_perm(cp, T, k, E, x_dev)
        got = run("moe_permute", v, d_idx, E, x_dev, out=out)
        assert got is out
        for name, g, w in zip(("counts", "offsets", "order", "slot"), (out.counts, out.offsets, out.order, out.slot),
                              want):
            g, w = cp.asnumpy(g).reshape(-1), w.reshape(-1)
            bad = np.flatnonzero(g != w)[:8]
            assert bad.size == 0, f"{label} {v}: {name} differs at {bad}: got {g[bad]} want {w[bad]}"
        if x_dev is not None:
            xh = cp.asnumpy(x_dev) if x_host is None else x_host
            xp = cp.asnumpy(out.x_perm)
            N = int(want[1][-1])
            src = want[2][:N] // k
            assert (xp[:N].view(np.uint8) == xh[src].view(np.uint8)).all(), f"{label} {v}: x_perm rows differ"
            assert np.isnan(xp[N:].astype(np.float32)).all(), f"{label} {v}: rows from N on were written"
    return names


PERMUTE_CASES = [(1, 1, 1), (1, 6, 256), (3, 6, 7), (64, 6, 256), (256, 6, 384), (1024, 8, 256), (2049, 6, 1024),
                 (4096, 6, 256), (5000, 9, 384), (16384, 6, 256), (2, 1, 1024), (700, 2, 3)]


@pytest.mark.parametrize("skip", [0.0, 0.25])
@pytest.mark.parametrize("T,k,E", PERMUTE_CASES, ids=[f"T{t}-k{k}-E{e}" for t, k, e in PERMUTE_CASES])
def test_permutation_variants_match_reference(cp, rng, T, k, E, skip):
    check_permute(cp, make_indices(rng, T, k, E, skip), E, label=f"T={T} k={k} E={E}",
                  need=("single_block", "chunked"))


@pytest.mark.parametrize("kind", ["one", "hot"])
@pytest.mark.parametrize("T", [5, 3000, 20000])
def test_skewed_routing(cp, rng, kind, T):
    check_permute(cp, make_indices(rng, T, 6, 256, 0.05, kind=kind), 256, label=f"{kind} T={T}")


def test_all_skipped(cp):
    check_permute(cp, np.full((300, 6), -1, np.int32), 64, label="all -1")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("D", [1, 7, 64, 4096, 7168])
def test_rows_every_dtype(cp, rng, dtype, D):
    T, k, E = 77, 6, 32
    check_permute(cp, make_indices(rng, T, k, E, 0.1), E, make_rows(rng, T, D, dtype), label=f"{dtype} D={D}")


@pytest.mark.parametrize("layout", ["strided", "offset"])
def test_rows_strided_and_misaligned(cp, rng, layout):
    T, k, E, D = 50, 4, 16, 256
    wide = cp.asarray(make_rows(rng, 2 * T, D + 8, "bfloat16"))
    x = wide[::2, 8:8 + D] if layout == "strided" else wide[1:T + 1, 1:1 + D]
    from ds4kern import explain

    idx = make_indices(rng, T, k, E, 0.1)
    want_bytes = 16 if layout == "strided" else 2
    assert explain("moe_permute", cp.asarray(idx), E, x).problem.copy_bytes == want_bytes
    check_permute(cp, idx, E, x_dev=x, label=layout)


def test_bad_ids_are_skipped_and_counted(cp, rng):
    T, k, E = 500, 6, 64
    idx = make_indices(rng, T, k, E, 0.1)
    idx[3, 2], idx[10, 0], idx[499, 5] = E, -5, 2 ** 31 - 1
    clean = np.where((idx < -1) | (idx >= E), -1, idx).astype(np.int32)
    want = reference_permutation(clean, E)
    for v in supported_variants("moe_permute", cp.asarray(idx), E):
        errors = cp.zeros(1, np.int32)
        out = poisoned_perm(cp, T, k, E)
        run("moe_permute", v, cp.asarray(idx), E, out=out, errors=errors)
        for g, w in zip((out.counts, out.offsets, out.order, out.slot), want):
            np.testing.assert_array_equal(cp.asnumpy(g), w, err_msg=v)
        assert int(errors[0]) == 3, v


def test_large_prefill(cp, rng):
    """The prefill size of the brief: T = 16384, k = 6, E = 256, D = 4096 bf16."""
    T, k, E, D = 16384, 6, 256, 4096
    idx = make_indices(rng, T, k, E, 0.01)
    x = make_rows(rng, T, D, "bfloat16")
    check_permute(cp, idx, E, x, label="prefill", need=("single_block", "chunked"))
    perm = moe_permute(cp.asarray(idx), E, cp.asarray(x))
    w = rng.random((T, k)).astype(np.float32)
    y = cp.asarray(make_rows(rng, T * k, D, "bfloat16"))
    got = cp.asnumpy(moe_unpermute(y, perm, cp.asarray(w)))
    want = reference_unpermute(cp.asnumpy(y), cp.asnumpy(perm.slot), w, got.dtype)
    assert (got.view(np.uint16) == want.view(np.uint16)).all()


# -- moe_unpermute ------------------------------------------------------------------------------


def check_unpermute(cp, y_dev, perm, w, out_dtype=None, out=None, label=""):
    y = cp.asnumpy(y_dev)
    slot = cp.asnumpy(perm.slot)
    odt = np.dtype(out.dtype) if out is not None else (y.dtype if out_dtype is None else DTYPES[out_dtype])
    want = reference_unpermute(y, slot, w, odt)
    names = supported_variants("moe_unpermute", y_dev, perm, cp.asarray(w), out=out, out_dtype=out_dtype)
    assert "naive" in names
    for v in names:
        o = out if out is not None else cp.full(want.shape, np.nan, np.float32).astype(odt)
        o[...] = cp.full(want.shape, np.nan, np.float32).astype(odt)
        run("moe_unpermute", v, y_dev, perm, cp.asarray(w), out=o)
        got = cp.asnumpy(o)
        assert got.dtype == odt
        assert (got.view(np.uint8) == want.view(np.uint8)).all(), (
            f"{label} {v}: {np.count_nonzero(got != want)} elements differ")


@pytest.mark.parametrize("y_dtype", sorted(DTYPES))
@pytest.mark.parametrize("out_dtype", [None, "float32"])
@pytest.mark.parametrize("T,k,E,D", [(1, 1, 4, 8), (3, 6, 256, 4096), (64, 6, 256, 7168), (1000, 8, 384, 100),
                                     (257, 3, 5, 7)])
def test_unpermute_matches_reference(cp, rng, T, k, E, D, y_dtype, out_dtype):
    idx = make_indices(rng, T, k, E, 0.2)
    idx[0] = -1  # a token with no expert: zeros
    perm = moe_permute(cp.asarray(idx), E)
    y = cp.asarray(make_rows(rng, T * k, D, y_dtype))
    w = rng.random((T, k)).astype(np.float32)
    check_unpermute(cp, y, perm, w, out_dtype, label=f"T={T} k={k} D={D} {y_dtype}->{out_dtype}")


@pytest.mark.parametrize("layout", ["strided", "offset"])
def test_unpermute_layouts(cp, rng, layout):
    T, k, E, D = 40, 6, 32, 512
    perm = moe_permute(cp.asarray(make_indices(rng, T, k, E, 0.1)), E)
    wide = cp.asarray(make_rows(rng, 2 * T * k + 2, D + 8, "bfloat16"))
    y = wide[::2, 8:8 + D] if layout == "strided" else wide[1:T * k + 1, 1:1 + D]
    out_wide = cp.zeros((T, D + 8), np.float32)
    out = out_wide[:, 8:] if layout == "strided" else out_wide[:, 1:1 + D]
    from ds4kern import explain

    w = rng.random((T, k)).astype(np.float32)
    assert explain("moe_unpermute", y, perm, cp.asarray(w), out=out).problem.vec == (8 if layout == "strided" else 1)
    check_unpermute(cp, y, perm, w, out=out, label=layout)


def test_unpermute_bad_slots_are_skipped_and_counted(cp, rng):
    T, k, E, D = 30, 4, 8, 64
    perm = moe_permute(cp.asarray(make_indices(rng, T, k, E)), E)
    y = cp.asarray(make_rows(rng, T * k, D, "float32"))
    w = rng.random((T, k)).astype(np.float32)
    slot = cp.asnumpy(perm.slot)
    bad = slot.copy()
    bad[2, 1], bad[7, 0] = T * k, -9
    clean = np.where((bad < -1) | (bad >= T * k), -1, bad).astype(np.int32)
    errors = cp.zeros(1, np.int32)
    perm_bad = MoePermutation(perm.counts, perm.offsets, perm.order, cp.asarray(bad), None, T, k, E)
    got = moe_unpermute(y, perm_bad, cp.asarray(w), errors=errors)
    want = reference_unpermute(cp.asnumpy(y), clean, w, np.float32)
    np.testing.assert_array_equal(cp.asnumpy(got), want)
    assert int(errors[0]) == 2


# -- no host synchronisation, CUDA graphs, torch ----------------------------------------------


def test_no_host_synchronisation(cp, rng):
    cupyx = pytest.importorskip("cupyx")
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    T, k, E, D = 4096, 6, 256, 512
    idx = cp.asarray(make_indices(rng, T, k, E, 0.05))
    x = cp.asarray(make_rows(rng, T, D, "bfloat16"))
    w = cp.asarray(rng.random((T, k)).astype(np.float32))
    for v in supported_variants("moe_permute", idx, E, x):  # compile outside the check
        perm = moe_permute(idx, E, x, variant=v)
        moe_unpermute(perm.x_perm, perm, w)
    cp.cuda.get_current_stream().synchronize()
    with cupyx.allow_synchronize(False):
        for v in supported_variants("moe_permute", idx, E, x):
            perm = moe_permute(idx, E, x, variant=v, errors=cp.zeros(1, np.int32))
            moe_unpermute(perm.x_perm, perm, w)
    cp.cuda.get_current_stream().synchronize()


def test_graph_capture_replays_every_variant(cp, rng):
    T, k, E, D = 300, 6, 64, 256
    idx = cp.asarray(make_indices(rng, T, k, E, 0.1))
    x = cp.asarray(make_rows(rng, T, D, "bfloat16"))
    w = cp.asarray(rng.random((T, k)).astype(np.float32))
    want = reference_permutation(cp.asnumpy(idx), E)
    for v in supported_variants("moe_permute", idx, E, x):
        out = poisoned_perm(cp, T, k, E, x)
        comb = cp.empty((T, D), x.dtype)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            moe_permute(idx, E, x, out=out, variant=v)  # warm-up: compiles, fills the pool
            moe_unpermute(out.x_perm, out, w, out=comb)
            s.synchronize()
            for a in (out.counts, out.offsets, out.order, out.slot):
                a.fill(POISON_INT)
            s.begin_capture()
            moe_permute(idx, E, x, out=out, variant=v)
            moe_unpermute(out.x_perm, out, w, out=comb)
            g = s.end_capture()
            for _ in range(3):
                g.launch(s)
            s.synchronize()
        for a, wa in zip((out.counts, out.offsets, out.order, out.slot), want):
            np.testing.assert_array_equal(cp.asnumpy(a), wa, err_msg=f"graph {v}")
        wc = reference_unpermute(cp.asnumpy(out.x_perm), want[3], cp.asnumpy(w), np.dtype(comb.dtype))
        assert (cp.asnumpy(comb).view(np.uint16) == wc.view(np.uint16)).all(), f"graph {v}"


def test_torch_in_torch_out(cp, rng):
    torch = pytest.importorskip("torch")
    T, k, E, D = 64, 6, 32, 128
    idx = make_indices(rng, T, k, E, 0.1)
    x = make_rows(rng, T, D, "float32")
    perm = moe_permute(torch.from_numpy(idx).cuda(), E, torch.from_numpy(x).cuda())
    assert isinstance(perm.slot, torch.Tensor) and perm.slot.is_cuda and isinstance(perm.x_perm, torch.Tensor)
    want = reference_permutation(idx, E)
    np.testing.assert_array_equal(perm.order.cpu().numpy(), want[2])
    w = rng.random((T, k)).astype(np.float32)
    got = moe_unpermute(perm.x_perm, perm, torch.from_numpy(w).cuda())
    assert isinstance(got, torch.Tensor)
    xp = perm.x_perm.cpu().numpy()
    np.testing.assert_array_equal(got.cpu().numpy(), reference_unpermute(xp, want[3], w, np.float32))
