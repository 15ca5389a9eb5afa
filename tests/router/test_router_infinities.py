"""What +inf logits and rows of only -inf give in router_topk (the rule in the docstring of
``ds4kern.ops.router.api``): the selection treats infinities as numbers, the weights follow IEEE
arithmetic as in torch (NaN from inf - inf or inf / inf).  The same table pins the reference and
every CUDA variant that runs the problem."""

import numpy as np
import pytest

import ds4kern

INF, NAN = np.inf, np.nan
ROWS = np.array([
    [0.0, INF, 1.0, 2.0, -1.0, -2.0, -3.0, -4.0],   # one +inf
    [-INF] * 8,                                       # only -inf
    [3.0] + [-INF] * 7,                               # one number, the rest -inf
], np.float32)
S3, S2 = 1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-2.0))  # sigmoid(3), sigmoid(2)

# (score_function, use_pre_softmax, k) -> (indices, weights) per row of ROWS
EXPECTED = {
    ("softmax", False, 2): ([[1, 3], [0, 1], [0, 1]], [[NAN, NAN], [NAN, NAN], [1, 0]]),
    ("softmax", True, 2): ([[0, 1], [0, 1], [0, 1]], [[NAN, NAN], [NAN, NAN], [1, 0]]),
    ("sigmoid", False, 2): ([[1, 3], [0, 1], [0, 1]], [[1 / (1 + S2), S2 / (1 + S2)], [0, 0], [1, 0]]),
    ("sigmoid", False, 1): ([[1], [0], [0]], [[1], [0], [S3]]),
    ("sqrtsoftplus", False, 2): ([[1, 3], [0, 1], [0, 1]], [[NAN, 0], [0, 0], [1, 0]]),
    ("sqrtsoftplus", False, 1): ([[1], [0], [0]], [[INF], [0], [np.sqrt(np.log1p(np.exp(3.0)))]]),
}
CASES = list(EXPECTED)


def check(w, i, key, label="reference"):
    want_i, want_w = (np.array(v, np.float64) for v in EXPECTED[key])
    np.testing.assert_array_equal(np.asarray(i), want_i.astype(np.int64), err_msg=f"{label} {key}: indices")
    # equal NaN / inf pattern, numbers within float32 rounding
    np.testing.assert_allclose(np.asarray(w, np.float64), want_w, rtol=2e-6, atol=1e-7, equal_nan=True,
                               err_msg=f"{label} {key}: weights")


@pytest.mark.parametrize("key", CASES, ids=lambda c: f"{c[0]}{'-pre' if c[1] else ''}-k{c[2]}")
def test_infinities_reference(key):
    sf, pre, k = key
    with np.errstate(all="raise"):  # no floating-point warning escapes to the caller
        w, i = ds4kern.router_topk(ROWS, k, score_function=sf, use_pre_softmax=pre)
    check(w, i, key)
    w, i = ds4kern.router_topk(ROWS, k, score_function=sf, use_pre_softmax=pre, scaling_factor=2.0)
    check(np.asarray(w) / 2, i, key)  # the scaling keeps NaN and inf as they are


@pytest.mark.gpu
@pytest.mark.parametrize("key", CASES, ids=lambda c: f"{c[0]}{'-pre' if c[1] else ''}-k{c[2]}")
def test_infinities_gpu(cp, key):
    from conftest import supported_variants

    sf, pre, k = key
    x = cp.asarray(ROWS)
    names = supported_variants("router_topk", x, k, score_function=sf, use_pre_softmax=pre)
    assert names, "no CUDA variant runs these rows"
    for name in names:
        w, i = ds4kern.router_topk(x, k, score_function=sf, use_pre_softmax=pre, variant=name)
        check(cp.asnumpy(w), cp.asnumpy(i), key, name)
