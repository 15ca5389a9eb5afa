"""TE dense form and backward, CUDA `naive` against the reference backend, over the spec's TE
sweep (T in {2048, 7168, 8992, 14234}, E in {32, 128, 1024}, k in {4, 8, 16, 32}, groups,
scaling, bias, index dtypes, bitmap shapes, leading dims) plus odd sizes.  Outputs are poisoned
before each run (the kernels allocate their own, so the poison goes into caller-given index
buffers; dense rows must be written everywhere, which the comparison with the reference checks).
"""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.router.checks import router_tolerances
from ds4kern.ops.router_te import unpack_bitmap

pytestmark = pytest.mark.gpu

MODES = [("softmax", False), ("softmax", True), ("sigmoid", False), ("sqrtsoftplus", False)]


def check_dense(cp, x, k, rng, out="bytemap", idx_dtype=None, variant="naive", x_dev=None, **kw):
    """GPU naive vs reference; returns (gpu outputs, reference outputs) as numpy."""
    E = x.shape[-1]
    x_d = cp.asarray(x) if x_dev is None else x_dev
    dkw = dict(kw)
    if kw.get("expert_bias") is not None:
        dkw["expert_bias"] = cp.asarray(kw["expert_bias"])
    if idx_dtype is not None:
        buf_h = np.full(x.shape[:-1] + (k,), -1, idx_dtype)
        buf_d = cp.asarray(buf_h)
        ref = ds4kern.router_topk_dense(x, k, topk_indices=buf_h, **kw)
        got = ds4kern.router_topk_dense(x_d, k, topk_indices=buf_d, variant=variant, **dkw)
        assert got[1] is buf_d
    else:
        ref = ds4kern.router_topk_dense(x, k, routing_map=out, **kw)
        got = ds4kern.router_topk_dense(x_d, k, routing_map=out, variant=variant, **dkw)
    p_r, i_r, in_r = ref
    p_d, i_d, in_d = (cp.asnumpy(a) for a in got)
    atol, rtol = router_tolerances(E)
    if x.dtype != np.float32:
        atol, rtol = max(atol, 8e-3), max(rtol, 8e-3)
    # selections (map or index rows) exact except where scores tie within float32 rounding
    lead = p_r.shape[:-1]
    same = (i_d == i_r).reshape(lead + (-1,)).all(-1)
    assert same.mean() > 0.995, f"{(~same).sum()} rows select other experts"
    np.testing.assert_allclose(p_d[same].astype(np.float32), p_r[same].astype(np.float32), atol=atol, rtol=rtol)
    fin = np.isfinite(in_r[same])
    assert (np.isfinite(in_d[same]) == fin).all()
    np.testing.assert_allclose(in_d[same][fin], in_r[same][fin], atol=atol, rtol=max(rtol, 2e-6))
    return (p_d, i_d, in_d), ref


SWEEP_EK = [(32, 4), (128, 8), (128, 16), (1024, 32), (1024, 4)]


@pytest.mark.parametrize("T", [2048, 7168, 8992, 14234])
@pytest.mark.parametrize("E,k", SWEEP_EK)
def test_te_sweep_forward_and_backward(cp, rng, T, E, k):
    sf, pre = MODES[([2048, 7168, 8992, 14234].index(T) + SWEEP_EK.index((E, k))) % 4]  # every mode, every T
    x = (2 * rng.standard_normal((T, E))).astype(np.float32)
    kw = dict(score_function=sf, use_pre_softmax=pre, scaling_factor=1.2 if T % 2 else None)
    if sf != "softmax" and T != 7168:
        kw["expert_bias"] = (0.2 * rng.standard_normal(E)).astype(np.float32)
    if T in (8992, 14234) and E >= 128 and not pre:
        kw.update(num_groups=8, group_topk=4)
    out = ("bytemap", "bitmap")[T % 3 == 0]
    _, (p_r, m_r, in_r) = check_dense(cp, x, k, rng, out=out, **kw)
    # backward from the map and from dense indices: both equal the reference
    G = rng.standard_normal((T, E)).astype(np.float32)
    bkw = dict(topk=k, score_function=sf, use_pre_softmax=pre, scaling_factor=kw["scaling_factor"])
    g_r = ds4kern.router_topk_backward(G, in_r, routing_map=m_r, **bkw)
    g_map = cp.asnumpy(ds4kern.router_topk_backward(cp.asarray(G), cp.asarray(in_r), routing_map=cp.asarray(m_r),
                                                    variant="naive", **bkw))
    idx = np.argsort(~(m_r if out == "bytemap" else unpack_bitmap(m_r, E)), axis=-1, kind="stable")[:, :k]
    g_idx = cp.asnumpy(ds4kern.router_topk_backward(cp.asarray(G), cp.asarray(in_r),
                                                    topk_indices=cp.asarray(idx.astype(np.int32)), variant="naive",
                                                    **bkw))
    scale = np.abs(g_r).max() + 1e-30
    np.testing.assert_allclose(g_map, g_r, atol=2e-6 * scale, rtol=2e-5)
    np.testing.assert_allclose(g_idx, g_r, atol=2e-6 * scale, rtol=2e-5)


@pytest.mark.parametrize("idx_dtype", [np.int16, np.int32, np.int64])
def test_dense_indices_and_leading_dims(cp, rng, idx_dtype):
    x = (2 * rng.standard_normal((128, 2, 32, 128))).astype(np.float32)
    check_dense(cp, x, 8, rng, idx_dtype=idx_dtype, score_function="sigmoid",
                expert_bias=(0.1 * rng.standard_normal(128)).astype(np.float32))


@pytest.mark.parametrize("shape,k", [((128, 32), 4), ((256, 128), 8), ((256, 130), 8), ((128, 1024), 16)])
def test_bitmap_shapes(cp, rng, shape, k):
    x = rng.standard_normal(shape).astype(np.float32)
    (_, bits, _), _ = check_dense(cp, x, k, rng, out="bitmap", score_function="softmax")
    assert bits.shape == shape[:-1] + ((shape[-1] + 7) // 8,) and bits.dtype == np.uint8
    assert (unpack_bitmap(bits, shape[-1]).sum(-1) == k).all()


@pytest.mark.parametrize("E,k", [(130, 1), (130, 130), (2304, 16), (7, 7)])
@pytest.mark.parametrize("T", [1, 33])
def test_odd_sizes(cp, rng, E, k, T):
    x = rng.standard_normal((T, E)).astype(np.float32)
    check_dense(cp, x, k, rng, score_function="sqrtsoftplus")
    check_dense(cp, x, k, rng, out="bitmap", score_function="softmax", use_pre_softmax=True)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
def test_narrow_logits_and_grads(cp, rng, dtype):
    x = rng.standard_normal((512, 256)).astype(dtype)
    check_dense(cp, x, 6, rng, score_function="sqrtsoftplus", scaling_factor=1.5,
                expert_bias=(0.1 * rng.standard_normal(256)).astype(np.float32))
    p, m, inter = ds4kern.router_topk_dense(x, 6, score_function="sigmoid")
    G = rng.standard_normal((512, 256)).astype(dtype)
    g_r = ds4kern.router_topk_backward(G, inter, topk=6, routing_map=m, score_function="sigmoid")
    g_d = ds4kern.router_topk_backward(cp.asarray(G), cp.asarray(inter), topk=6, routing_map=cp.asarray(m),
                                       score_function="sigmoid", variant="naive")
    assert g_d.dtype == dtype
    np.testing.assert_allclose(cp.asnumpy(g_d).astype(np.float32), g_r.astype(np.float32), atol=1e-2, rtol=1e-2)


def test_empty_and_dispatch(cp, rng):
    x = cp.zeros((0, 64), cp.float32)
    p, m, inter = ds4kern.router_topk_dense(x, 4)
    assert p.shape == (0, 64) and m.shape == (0, 64)
    y = cp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
    d = ds4kern.explain("router_topk_dense", y, 4)
    assert d.chosen.name == "naive"
    _, m, inter = ds4kern.router_topk_dense(y, 4)
    d = ds4kern.explain("router_topk_backward", y, inter, topk=4, routing_map=m)
    assert d.chosen.name == "naive"


@pytest.mark.parametrize("sf", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("T,E,k", [(2048, 32, 4), (2048, 128, 8), (7168, 1024, 32), (33, 130, 5), (1, 7, 7)])
def test_aux_scores_and_backward(cp, rng, sf, T, E, k):
    x = (2 * rng.standard_normal((T, E))).astype(np.float32)
    p_r, m_r, in_r = ds4kern.router_aux_scores(x, k, score_function=sf)
    p_d, m_d, in_d = (cp.asnumpy(a) for a in ds4kern.router_aux_scores(cp.asarray(x), k, score_function=sf,
                                                                        variant="naive"))
    atol, rtol = router_tolerances(E)
    np.testing.assert_allclose(p_d, p_r, atol=atol, rtol=rtol)
    np.testing.assert_allclose(in_d, in_r, atol=atol, rtol=max(rtol, 2e-6))
    same = (m_d == m_r).all(-1)
    assert same.mean() > 0.995 and (m_d.sum(-1) == k).all()
    G = rng.standard_normal((T, E)).astype(np.float32)
    g_r = ds4kern.router_aux_scores_backward(G, in_r, score_function=sf)
    g_d = cp.asnumpy(ds4kern.router_aux_scores_backward(cp.asarray(G), cp.asarray(in_r), score_function=sf,
                                                        variant="naive"))
    np.testing.assert_allclose(g_d, g_r, atol=2e-6 * (np.abs(g_r).max() + 1e-30), rtol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16])
def test_aux_loss_and_backward_deterministic(cp, rng, dtype):
    T, E, k = 14234, 256, 6
    probs = rng.random((T, E)).astype(dtype)
    tpe = rng.integers(0, 400, E).astype(np.int64)
    l_r = ds4kern.router_aux_loss(probs, tpe, topk=k, coeff=1e-2)
    p_d, t_d = cp.asarray(probs), cp.asarray(tpe)
    l_d = [float(ds4kern.router_aux_loss(p_d, t_d, topk=k, coeff=1e-2, variant="naive")) for _ in range(3)]
    assert l_d[0] == l_d[1] == l_d[2]  # same bits every run
    assert l_d[0] == pytest.approx(float(l_r), rel=1e-5)
    for gl in (0.5, cp.asarray(np.float32(0.5))):
        g_d = ds4kern.router_aux_loss_backward(gl, p_d, t_d, topk=k, coeff=1e-2, variant="naive")
        g_r = ds4kern.router_aux_loss_backward(0.5, probs, tpe, topk=k, coeff=1e-2)
        assert g_d.dtype == dtype and g_d.shape == (T, E)
        np.testing.assert_allclose(cp.asnumpy(g_d).astype(np.float32), g_r.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16])
@pytest.mark.parametrize("sf,k", [("sqrtsoftplus", 6), ("sigmoid", 1), ("softmax", 8), ("sigmoid", 13),
                                  ("softmax", 32), ("sqrtsoftplus", 40)])
@pytest.mark.parametrize("T,E", [(1, 256), (33, 256), (4133, 256), (77, 7), (300, 130)])
def test_backward_from_indices_segments(cp, rng, dtype, sf, k, T, E):
    """The segmented backward (dense indices, not softmax pre; 16 or 32 lanes per token, more than
    one entry per lane when k > 16): partial warps and blocks, E not a multiple of 8 (scalar zero
    fill), strided int16 indices, entries outside [0, E), and a pool poisoned with NaN so unwritten
    zeros fail."""
    k = min(k, E)
    x = (2 * rng.standard_normal((T, E))).astype(np.float32)
    _, idx, inter = ds4kern.router_topk_dense(x, k, score_function=sf, topk_indices=np.empty((T, k), np.int64))
    G = rng.standard_normal((T, E)).astype(dtype)
    bad = idx.copy()
    bad[::5, 0] = E + 3  # selects nothing
    bad[1::7, -1] = -2
    for ids in (idx, bad):
        bkw = dict(topk=k, score_function=sf, scaling_factor=1.3)
        g_r = ds4kern.router_topk_backward(G.astype(np.float32), inter, topk_indices=ids, **bkw)
        wide = cp.full((T, 2 * k), 7, cp.int16)
        wide[:, ::2] = cp.asarray(ids.astype(np.int16))
        for _ in range(2):  # poison the pool's free block of the output size, then allocate through the op
            junk = cp.full((T, E), cp.nan, dtype=dtype)
            del junk
            g_d = ds4kern.router_topk_backward(cp.asarray(G), cp.asarray(inter), topk_indices=wide[:, ::2],
                                               variant="naive", **bkw)
            got = cp.asnumpy(g_d).astype(np.float32)
            assert np.isfinite(got).all()
            tol = 2e-6 if dtype == np.float32 else 8e-3
            scale = np.abs(g_r).max() + 1e-30
            np.testing.assert_allclose(got, g_r, atol=tol * scale, rtol=10 * tol)
            sel = np.zeros((T, E), bool)
            ok = (ids >= 0) & (ids < E)
            sel[np.nonzero(ok)[0], ids[ok]] = True
            assert (got[~sel] == 0).all()  # zero-filled everywhere else
