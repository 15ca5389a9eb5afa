"""TE dense form (reference backend): forward consistent with the compact form, routing map /
bitmap / dense indices, intermediates, and backward against float64 finite differences."""

import numpy as np
import pytest
import scipy.special as sps

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.router_te import pack_bitmap, unpack_bitmap

MODES = [("softmax", False), ("softmax", True), ("sigmoid", False), ("sqrtsoftplus", False)]


@pytest.mark.parametrize("sf,pre", MODES)
@pytest.mark.parametrize("E,k,groups", [(32, 4, None), (130, 8, None), (256, 8, (8, 4)), (64, 1, None), (40, 40, None)])
def test_dense_forward_matches_compact(rng, sf, pre, E, k, groups):
    x = (2 * rng.standard_normal((3, 11, E))).astype(np.float32)
    kw = dict(score_function=sf, use_pre_softmax=pre, scaling_factor=1.5)
    if sf != "softmax":
        kw["expert_bias"] = (0.2 * rng.standard_normal(E)).astype(np.float32)
    if groups:
        kw.update(num_groups=groups[0], group_topk=groups[1])
    w, i = ds4kern.router_topk(x, k, index_dtype="int64", **kw)
    probs, bmap, inter = ds4kern.router_topk_dense(x, k, **kw)
    _, bits, _ = ds4kern.router_topk_dense(x, k, routing_map="bitmap", **kw)
    buf = np.full((3, 11, k), -1, np.int16)
    _, idx, _ = ds4kern.router_topk_dense(x, k, topk_indices=buf, **kw)
    assert idx is buf and probs.shape == x.shape and probs.dtype == x.dtype and inter.dtype == np.float32
    np.testing.assert_array_equal(buf, i)
    assert bmap.dtype == np.bool_ and bits.shape == (3, 11, (E + 7) // 8) and bits.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bitmap(bits, E), bmap)
    np.testing.assert_array_equal(np.take_along_axis(probs, i, -1), w)
    assert (probs[~bmap] == 0).all() and bmap.sum(-1).max() == k
    # intermediates as TE defines them
    if sf == "softmax" and pre:
        np.testing.assert_allclose(inter, sps.softmax(x.astype(np.float64), -1), rtol=1e-5, atol=1e-7)
    elif sf == "softmax":
        assert np.isneginf(inter[~bmap]).all()
        np.testing.assert_allclose(np.take_along_axis(inter, i, -1), w / 1.5, rtol=1e-6)
    elif sf == "sigmoid":
        np.testing.assert_allclose(inter, sps.expit(x.astype(np.float64)), rtol=1e-6)
    else:
        np.testing.assert_array_equal(inter, x)


def test_bitmap_layout_is_lsb_first():
    m = np.zeros((1, 10), bool)
    m[0, [0, 3, 9]] = True
    assert pack_bitmap(m).tolist() == [[0b00001001, 0b00000010]]


def probs64(x, sel_mask, sf, pre, scaling):
    """float64 dense probs for a fixed selection (selection is piecewise constant)."""
    x = x.astype(np.float64)
    k = int(sel_mask[0].sum())
    if sf == "softmax":
        if pre:
            return np.where(sel_mask, sps.softmax(x, -1), 0.0) * scaling
        z = np.where(sel_mask, x, -np.inf)
        return np.where(sel_mask, sps.softmax(z, -1), 0.0) * scaling
    s = sps.expit(x) if sf == "sigmoid" else np.sqrt(np.where(x > 20, x, np.logaddexp(0.0, x)))
    s = np.where(sel_mask, s, 0.0)
    if k > 1:
        s = s / (s.sum(-1, keepdims=True) + 1e-20)
    return s * scaling


@pytest.mark.parametrize("sf,pre", MODES)
@pytest.mark.parametrize("k", [1, 6])
def test_backward_matches_finite_differences(rng, sf, pre, k):
    T, E, scaling = 9, 24, 2.5
    x = (1.5 * rng.standard_normal((T, E))).astype(np.float32)
    x[0, 3] = 25.0  # past the softplus switch
    probs, bmap, inter = ds4kern.router_topk_dense(x, k, score_function=sf, use_pre_softmax=pre,
                                                   scaling_factor=scaling)
    G = rng.standard_normal((T, E)).astype(np.float32)
    grads = [
        ds4kern.router_topk_backward(G, inter, topk=k, routing_map=bmap, score_function=sf,
                                     use_pre_softmax=pre, scaling_factor=scaling),
        ds4kern.router_topk_backward(G, inter, topk=k, routing_map=pack_bitmap(bmap), score_function=sf,
                                     use_pre_softmax=pre, scaling_factor=scaling),
        ds4kern.router_topk_backward(G, inter, topk=k, score_function=sf, use_pre_softmax=pre,
                                     scaling_factor=scaling,
                                     topk_indices=ds4kern.router_topk_dense(
                                         x, k, score_function=sf, use_pre_softmax=pre, scaling_factor=scaling,
                                         topk_indices=np.empty((T, k), np.int32))[1]),
    ]
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_allclose(grads[0], grads[2], rtol=1e-6, atol=1e-7)
    # central differences of f(x) = sum(probs(x) * G) in float64, selection held fixed
    h = 1e-6
    num = np.zeros((T, E))
    x64 = x.astype(np.float64)
    for e in range(E):
        xp, xm = x64.copy(), x64.copy()
        xp[:, e] += h
        xm[:, e] -= h
        num[:, e] = ((probs64(xp, bmap, sf, pre, scaling) - probs64(xm, bmap, sf, pre, scaling)) * G).sum(-1) / (2 * h)
    np.testing.assert_allclose(grads[0], num, rtol=2e-4, atol=2e-5)


def test_backward_dtype_and_leading_dims(rng):
    x = rng.standard_normal((2, 5, 32)).astype(BFLOAT16)
    probs, bmap, inter = ds4kern.router_topk_dense(x, 4, score_function="sigmoid")
    assert probs.dtype == BFLOAT16
    g = ds4kern.router_topk_backward(np.ones_like(probs), inter, topk=4, routing_map=bmap, score_function="sigmoid")
    assert g.shape == (2, 5, 32) and g.dtype == BFLOAT16
    assert (g.astype(np.float32)[~bmap] == 0).all()


def test_backward_indices_outside_range_select_nothing(rng):
    x = rng.standard_normal((40, 16)).astype(np.float32)
    _, idx, inter = ds4kern.router_topk_dense(x, 4, score_function="sigmoid", topk_indices=np.empty((40, 4), np.int32))
    G = rng.standard_normal((40, 16)).astype(np.float32)
    bad = idx.copy()
    bad[::3, 1] = 16
    bad[1::4, 3] = -1
    got = ds4kern.router_topk_backward(G, inter, topk=4, topk_indices=bad, score_function="sigmoid")
    bmap = np.zeros((40, 16), bool)
    for t in range(40):
        bmap[t, [e for e in bad[t] if 0 <= e < 16]] = True
    want = ds4kern.router_topk_backward(G, inter, topk=4, routing_map=bmap, score_function="sigmoid")
    np.testing.assert_array_equal(got, want)
    assert (got[~bmap] == 0).all() and (got[bmap] != 0).any()


@pytest.mark.parametrize("kw,exc,word", [
    (dict(routing_map="dense"), ValueError, "routing_map"),
    (dict(topk_indices=np.zeros((4, 2), np.uint8)), TypeError, "topk_indices"),
    (dict(topk_indices=np.zeros((4, 3), np.int32)), ValueError, "topk_indices"),
    (dict(topk=0), ValueError, "topk"),
])
def test_dense_validation(kw, exc, word):
    kw = {"topk": 2, **kw}
    with pytest.raises(exc, match=word):
        ds4kern.router_topk_dense(np.ones((4, 16), np.float32), **kw)


def test_backward_validation(rng):
    x = rng.standard_normal((4, 16)).astype(np.float32)
    _, bmap, inter = ds4kern.router_topk_dense(x, 2, score_function="sigmoid")
    g = np.ones_like(x)
    with pytest.raises(ValueError, match="exactly one"):
        ds4kern.router_topk_backward(g, inter, topk=2, score_function="sigmoid")
    with pytest.raises(ValueError, match="exactly one"):
        ds4kern.router_topk_backward(g, inter, topk=2, routing_map=bmap, topk_indices=np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match="routing_map"):
        ds4kern.router_topk_backward(g, inter, topk=2, routing_map=bmap[:, :8])
    with pytest.raises(TypeError, match="intermediate"):
        ds4kern.router_topk_backward(g, inter.astype(np.float64), topk=2, routing_map=bmap)
    with pytest.raises(ValueError, match="intermediate"):
        ds4kern.router_topk_backward(g, inter[:2], topk=2, routing_map=bmap)
    with pytest.raises(TypeError, match="grad_probs"):
        ds4kern.router_topk_backward(g.astype(np.float64), inter, topk=2, routing_map=bmap)


# ---------------------------------------------------------------- aux-loss ops

def aux_scores64(x, sf):
    x = x.astype(np.float64)
    if sf == "softmax":
        return sps.softmax(x, -1)
    s = sps.expit(x) if sf == "sigmoid" else np.sqrt(np.where(x > 20, x, np.logaddexp(0.0, x)))
    return s / (s.sum(-1, keepdims=True) + 1e-20)


@pytest.mark.parametrize("sf", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_scores_forward_and_backward(rng, sf):
    T, E, k = 7, 20, 4
    x = (1.5 * rng.standard_normal((T, E))).astype(np.float32)
    x[1, 2] = 23.0
    scores, rmap, inter = ds4kern.router_aux_scores(x, k, score_function=sf)
    ref = aux_scores64(x, sf)
    np.testing.assert_allclose(scores, ref, rtol=2e-6, atol=1e-8)
    top = np.lexsort((np.tile(np.arange(E), (T, 1)), -ref), axis=-1)[:, :k]
    want = np.zeros((T, E), bool)
    np.put_along_axis(want, top, True, axis=1)
    np.testing.assert_array_equal(rmap, want)
    G = rng.standard_normal((T, E)).astype(np.float32)
    grad = ds4kern.router_aux_scores_backward(G, inter, score_function=sf)
    h, num = 1e-6, np.zeros((T, E))
    for e in range(E):
        xp, xm = x.astype(np.float64), x.astype(np.float64)
        xp[:, e] += h
        xm[:, e] -= h
        num[:, e] = ((aux_scores64(xp, sf) - aux_scores64(xm, sf)) * G).sum(-1) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=2e-4, atol=2e-6)


def test_aux_loss_forward_backward_deterministic(rng):
    T, E, k, coeff = 300, 64, 6, 1e-2
    probs = rng.random((T, E)).astype(np.float32)
    tpe = rng.integers(0, 50, E).astype(np.int64)
    loss = ds4kern.router_aux_loss(probs, tpe, topk=k, coeff=coeff)
    want = (probs.astype(np.float64).sum(0) * tpe).sum() * E * coeff / (k * T * T)
    assert loss.shape == () and loss.dtype == np.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert all(float(ds4kern.router_aux_loss(probs, tpe, topk=k, coeff=coeff)) == float(loss) for _ in range(5))
    g = ds4kern.router_aux_loss_backward(np.float32(2.0), probs, tpe, topk=k, coeff=coeff)
    np.testing.assert_allclose(g, np.tile(tpe * E * coeff / (k * T * T) * 2.0, (T, 1)), rtol=1e-6)
    # the loss is linear in probs: its gradient is exactly that of a finite difference
    d = rng.standard_normal((T, E)).astype(np.float64) * 0.1  # large enough to dwarf float32 rounding
    diff = (float(ds4kern.router_aux_loss((probs + d).astype(np.float32), tpe, topk=k, coeff=coeff)) - float(loss))
    np.testing.assert_allclose(diff, (g.astype(np.float64) / 2.0 * d).sum(), rtol=2e-2)
    # num_tokens other than the rows (e.g. the global token count)
    l2 = ds4kern.router_aux_loss(probs, tpe, topk=k, coeff=coeff, num_tokens=2 * T)
    np.testing.assert_allclose(float(l2), float(loss) / 4, rtol=1e-6)


@pytest.mark.parametrize("call,word", [
    (lambda: ds4kern.router_aux_loss(np.ones((4, 8), np.float32), np.ones(7), topk=2, coeff=1.0), "tokens_per_expert"),
    (lambda: ds4kern.router_aux_loss(np.ones((4, 8), np.float32), np.ones(8), topk=9, coeff=1.0), "topk"),
    (lambda: ds4kern.router_aux_loss(np.ones((4, 8), np.float32), np.ones(8), topk=2, coeff=float("inf")), "coeff"),
    (lambda: ds4kern.router_aux_loss(np.ones((2, 4, 8), np.float32), np.ones(8), topk=2, coeff=1.0), "probs"),
    (lambda: ds4kern.router_aux_loss_backward(np.ones(3), np.ones((4, 8), np.float32), np.ones(8), topk=2, coeff=1.0),
     "grad_loss"),
    (lambda: ds4kern.router_aux_scores(np.ones((4, 8), np.float32), 0), "topk"),
    (lambda: ds4kern.router_aux_loss(np.ones((4, 8), np.float32), np.arange(8) - 1, topk=2, coeff=1.0),
     "tokens_per_expert must be counts >= 0"),
    (lambda: ds4kern.router_aux_loss_backward(1.0, np.ones((4, 8), np.float32), -np.ones(8), topk=2, coeff=1.0),
     "tokens_per_expert must be counts >= 0"),
    (lambda: ds4kern.router_aux_loss(np.ones((0, 8), np.float32), np.ones(8), topk=2, coeff=1.0), "no rows"),
    (lambda: ds4kern.router_aux_loss(np.ones((4, 8), np.float32), np.ones(8), topk=2, coeff=True), "coeff"),
    (lambda: ds4kern.router_aux_scores_backward(np.ones((4, 8), np.float32), np.ones((4, 8))), "intermediate"),
])
def test_aux_validation(call, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call()


def test_explain_covers_every_op():
    x = np.ones((4, 16), np.float32)
    assert ds4kern.explain("router_topk_dense", x, 2).chosen.name == "reference"
    _, m, inter = ds4kern.router_topk_dense(x, 2)
    assert ds4kern.explain("router_topk_backward", x, inter, topk=2, routing_map=m).chosen.name == "reference"
    assert ds4kern.explain("router_aux_scores", x, 2).chosen.name == "reference"
    assert ds4kern.explain("router_aux_loss", x, np.ones(16), topk=2, coeff=1.0).chosen.name == "reference"
    assert ds4kern.explain("router_aux_loss_backward", 1.0, x, np.ones(16), topk=2, coeff=1.0).chosen.name == "reference"
    assert ds4kern.explain("router_aux_scores_backward", x, inter, score_function="softmax").chosen.name == "reference"
