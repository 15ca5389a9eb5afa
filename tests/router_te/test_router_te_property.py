"""Property tests of the TE-form ops: on random problems (shapes, dtypes, score functions, groups,
output formats, offsets and strides of the inputs), every CUDA variant the registry says supports
the problem equals the reference.  Derandomised: a failure reproduces from its test id."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
from conftest import supported_variants
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.router.checks import router_tolerances
from test_router_property import device_logits
from test_router_te_gpu import check_dense

pytestmark = pytest.mark.gpu
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16}
PROP = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def dense_problems(draw):
    E = draw(st.sampled_from([7, 32, 64, 130, 256, 1024, 2304]))
    k = draw(st.integers(1, min(E, 40)))
    sf, pre = draw(st.sampled_from([("softmax", False), ("softmax", True), ("sigmoid", False),
                                    ("sqrtsoftplus", False)]))
    groups = (0, 0)
    if not pre and draw(st.booleans()):
        opts = [(G, gt) for G in range(2, 33) if E % G == 0 for gt in range(1, G + 1)
                if k % gt == 0 and k // gt <= E // G]
        groups = draw(st.sampled_from(opts)) if opts else (0, 0)
    T = draw(st.integers(1, 600))
    return dict(E=E, k=k, sf=sf, pre=pre, groups=groups, T=T, dtype=draw(st.sampled_from(sorted(DTYPES))),
                layout=draw(st.sampled_from(["contiguous", "offset", "strided"])), offset=draw(st.integers(1, 7)),
                out=draw(st.sampled_from(["bytemap", "bitmap", "int16", "int32", "int64"])),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@PROP
@given(dense_problems())
def test_dense_and_backward_every_supported_variant(cp, p):
    rng = np.random.default_rng(p["seed"])
    T, E, k = p["T"], p["E"], p["k"]
    x = (2 * rng.standard_normal((T, E))).astype(DTYPES[p["dtype"]])
    x_d = device_logits(cp, x, p["layout"], p["offset"])
    kw = dict(score_function=p["sf"], use_pre_softmax=p["pre"])
    if p["bias"] and p["sf"] != "softmax":
        kw["expert_bias"] = (0.2 * rng.standard_normal(E)).astype(np.float32)
    if p["groups"][0]:
        kw.update(num_groups=p["groups"][0], group_topk=p["groups"][1])
    idx_dtype = None if p["out"] in ("bytemap", "bitmap") or (p["out"] == "int16" and E > 32767) else p["out"]
    dkw = dict(kw, expert_bias=None if "expert_bias" not in kw else cp.asarray(kw["expert_bias"]))
    for name in supported_variants("router_topk_dense", x_d, k, **dkw):
        (_, m_d, in_d), (_, m_r, in_r) = check_dense(cp, x, k, rng, out=p["out"] if idx_dtype is None else "bytemap",
                                                     idx_dtype=idx_dtype, variant=name, x_dev=x_d, **kw)
    # backward from the reference forward's routing, on strided / offset gradients
    if idx_dtype is not None:
        return
    G = rng.standard_normal((T, E)).astype(DTYPES[p["dtype"]])
    G_d = device_logits(cp, G, p["layout"], p["offset"])
    bkw = dict(topk=k, score_function=p["sf"], use_pre_softmax=p["pre"])
    g_r = ds4kern.router_topk_backward(G, in_r, routing_map=m_r, **bkw).astype(np.float32)
    tol = 2e-6 if p["dtype"] == "float32" else 1e-2
    for name in supported_variants("router_topk_backward", G_d, cp.asarray(in_r), routing_map=cp.asarray(m_r), **bkw):
        g_d = ds4kern.router_topk_backward(G_d, cp.asarray(in_r), routing_map=cp.asarray(m_r), variant=name, **bkw)
        scale = np.abs(g_r).max() + 1e-30
        np.testing.assert_allclose(cp.asnumpy(g_d).astype(np.float32), g_r, atol=tol * scale, rtol=10 * tol)


@PROP
@given(st.integers(1, 700), st.sampled_from([7, 32, 130, 256, 1024]), st.integers(1, 8),
       st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]), st.sampled_from(["contiguous", "offset", "strided"]),
       st.integers(0, 2**31 - 1))
def test_aux_ops_every_supported_variant(cp, T, E, k, sf, layout, seed):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    x = (2 * rng.standard_normal((T, E))).astype(np.float32)
    x_d = device_logits(cp, x, layout, 3)
    p_r, m_r, in_r = ds4kern.router_aux_scores(x, k, score_function=sf)
    atol, rtol = router_tolerances(E)
    for name in supported_variants("router_aux_scores", x_d, k, score_function=sf):
        p_d, m_d, in_d = (cp.asnumpy(a) for a in ds4kern.router_aux_scores(x_d, k, score_function=sf, variant=name))
        np.testing.assert_allclose(p_d, p_r, atol=atol, rtol=rtol)
        assert (m_d.sum(-1) == k).all() and (m_d == m_r).all(-1).mean() > 0.99
    G = rng.standard_normal((T, E)).astype(np.float32)
    g_r = ds4kern.router_aux_scores_backward(G, in_r, score_function=sf)
    G_d = device_logits(cp, G, layout, 1)
    for name in supported_variants("router_aux_scores_backward", G_d, cp.asarray(in_r), score_function=sf):
        g_d = ds4kern.router_aux_scores_backward(G_d, cp.asarray(in_r), score_function=sf, variant=name)
        np.testing.assert_allclose(cp.asnumpy(g_d), g_r, atol=2e-6 * (np.abs(g_r).max() + 1e-30), rtol=2e-5)
    tpe = rng.integers(0, 50, E).astype(np.int64)
    probs = rng.random((T, E)).astype(np.float32)
    pr_d = device_logits(cp, probs, layout, 2)
    l_r = float(ds4kern.router_aux_loss(probs, tpe, topk=k, coeff=1e-2))
    for name in supported_variants("router_aux_loss", pr_d, cp.asarray(tpe), topk=k, coeff=1e-2):
        assert float(ds4kern.router_aux_loss(pr_d, cp.asarray(tpe), topk=k, coeff=1e-2, variant=name)) == \
            pytest.approx(l_r, rel=1e-5, abs=1e-12)
    gb_r = ds4kern.router_aux_loss_backward(0.5, probs, tpe, topk=k, coeff=1e-2)
    for name in supported_variants("router_aux_loss_backward", 0.5, pr_d, cp.asarray(tpe), topk=k, coeff=1e-2):
        gb = ds4kern.router_aux_loss_backward(0.5, pr_d, cp.asarray(tpe), topk=k, coeff=1e-2, variant=name)
        np.testing.assert_allclose(cp.asnumpy(gb), gb_r, rtol=1e-6)
