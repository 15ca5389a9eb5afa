"""Reference backend of router_topk against an independent float64 scipy formulation, plus
validation errors, ties, NaN, empty input and leading dims (all on the CPU)."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.router.checks import compare_router, group_tie_rows, router_scores64, router_tolerances, router_topk64

MODES = [
    dict(score_function="softmax", use_pre_softmax=False),
    dict(score_function="softmax", use_pre_softmax=True),
    dict(score_function="sigmoid"),
    dict(score_function="sigmoid", bias=True),
    dict(score_function="sqrtsoftplus"),
    dict(score_function="sqrtsoftplus", bias=True),
]


def _run_both(x, k, mode, rng, scaling=None, index_dtype="int32"):
    mode = dict(mode)
    bias = (0.3 * rng.standard_normal(x.shape[-1])).astype(np.float32) if mode.pop("bias", False) else None
    w, i = ds4kern.router_topk(x, k, expert_bias=bias, scaling_factor=scaling, index_dtype=index_dtype, **mode)
    x32 = np.asarray(x).astype(np.float32).reshape(-1, x.shape[-1])
    w64, i64, sel = router_topk64(x32, k, mode["score_function"], mode.get("use_pre_softmax", False), bias,
                                  1.0 if scaling is None else scaling)
    return w, i, w64, i64, sel


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
@pytest.mark.parametrize("E,k", [(1, 1), (7, 3), (32, 4), (130, 8), (256, 6), (256, 256), (2304, 16)])
def test_reference_matches_float64(mode, E, k, rng):
    x = (rng.standard_normal((37, E)) * 2).astype(np.float32)
    w, i, w64, i64, sel = _run_both(x, k, mode, rng, scaling=1.5)
    assert w.dtype == np.float32 and i.dtype == np.int32 and w.shape == (37, k) == i.shape
    atol, rtol = router_tolerances(E)
    cmp = compare_router(w, i, w64, i64, sel, atol, rtol)
    assert cmp.ok, cmp
    assert cmp.tie_rows <= 1, cmp


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_logits(dtype, rng):
    dt = BFLOAT16 if dtype == "bfloat16" else np.float16
    x = rng.standard_normal((64, 256)).astype(dt)
    w, i, w64, i64, sel = _run_both(x, 6, dict(score_function="sqrtsoftplus", bias=True), rng)
    cmp = compare_router(w, i, w64, i64, sel, *router_tolerances(256))
    assert cmp.ok, cmp


def test_ties_go_to_lower_index(rng):
    # integer logits: many exact ties; the chosen set and order are fully determined
    x = rng.integers(-2, 3, size=(200, 64)).astype(np.float32)
    for mode in MODES:
        mode = {k: v for k, v in mode.items() if k != "bias"}
        w, i = ds4kern.router_topk(x, 10, **mode)
        w64, i64, sel = router_topk64(x, 10, mode["score_function"], mode.get("use_pre_softmax", False), None)
        np.testing.assert_array_equal(i, i64)


def test_all_equal_row_picks_first_k():
    x = np.full((3, 40), 0.25, np.float32)
    _, i = ds4kern.router_topk(x, 5, score_function="sigmoid")
    np.testing.assert_array_equal(i, np.tile(np.arange(5), (3, 1)))
    x[1] = -0.0  # -0 and +0 tie
    x[1, ::2] = 0.0
    _, i = ds4kern.router_topk(x, 5)
    np.testing.assert_array_equal(i[1], np.arange(5))


def test_nan_rule():
    x = np.array([[np.nan, 1.0, np.nan, -np.inf, 2.0, -1.0]], np.float32)
    _, i = ds4kern.router_topk(x, 4, score_function="sigmoid")
    np.testing.assert_array_equal(i[0], [4, 1, 5, 3])  # numbers (even -inf) before NaN
    w, i = ds4kern.router_topk(x, 6, score_function="sigmoid")
    np.testing.assert_array_equal(i[0], [4, 1, 5, 3, 0, 2])  # NaNs last, by index
    assert np.isnan(w).all()  # a NaN in the normalisation makes the row NaN
    _, i = ds4kern.router_topk(x, 3, score_function="softmax")
    np.testing.assert_array_equal(i[0], [4, 1, 5])


@pytest.mark.parametrize("index_dtype", ["int16", "int32", "int64", np.int64, np.dtype("int16")])
def test_index_dtypes_and_leading_dims(index_dtype, rng):
    x = rng.standard_normal((2, 3, 5, 33)).astype(np.float32)
    w, i = ds4kern.router_topk(x, 4, score_function="sigmoid", index_dtype=index_dtype)
    assert w.shape == (2, 3, 5, 4) and i.shape == (2, 3, 5, 4)
    assert i.dtype == np.dtype(index_dtype)
    w2, i2 = ds4kern.router_topk(x.reshape(-1, 33), 4, score_function="sigmoid")
    np.testing.assert_array_equal(i.reshape(-1, 4), i2)
    np.testing.assert_array_equal(w.reshape(-1, 4), w2)


def test_single_row_and_empty():
    x = np.arange(8, dtype=np.float32)
    w, i = ds4kern.router_topk(x, 2)
    assert w.shape == (2,) and list(i) == [7, 6]
    w, i = ds4kern.router_topk(np.zeros((0, 16), np.float32), 3)
    assert w.shape == (0, 3) and i.shape == (0, 3)
    w, i = ds4kern.router_topk(np.zeros((4, 0, 16), np.float32), 3)
    assert w.shape == (4, 0, 3)


def test_non_contiguous_input(rng):
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w, i = ds4kern.router_topk(x[:, ::2], 3)
    w2, i2 = ds4kern.router_topk(np.ascontiguousarray(x[:, ::2]), 3)
    np.testing.assert_array_equal(i, i2)


def test_out_argument(rng):
    x = rng.standard_normal((10, 32)).astype(np.float32)
    w = np.full((10, 4), np.nan, np.float32)
    i = np.full((10, 4), -1, np.int64)
    rw, ri = ds4kern.router_topk(x, 4, index_dtype="int64", out=(w, i))
    assert rw is w and ri is i
    w2, i2 = ds4kern.router_topk(x, 4, index_dtype="int64")
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(w, w2)


def test_scaling_and_k1(rng):
    x = rng.standard_normal((20, 16)).astype(np.float32)
    w1, _ = ds4kern.router_topk(x, 1, score_function="sigmoid")
    w2, _ = ds4kern.router_topk(x, 1, score_function="sigmoid", scaling_factor=2.5)
    np.testing.assert_allclose(w2, 2.5 * w1, rtol=1e-6)
    # k = 1: the unnormalised score
    np.testing.assert_allclose(w1[:, 0], 1 / (1 + np.exp(-x.max(1).astype(np.float64))), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(topk=0), ValueError, "topk"),
        (dict(topk=17), ValueError, "topk"),
        (dict(topk=2.0), TypeError, "topk"),
        (dict(topk=True), TypeError, "topk"),
        (dict(score_function="relu"), ValueError, "score_function"),
        (dict(score_function="sigmoid", use_pre_softmax=True), ValueError, "use_pre_softmax"),
        (dict(expert_bias=np.zeros(16, np.float32)), ValueError, "expert_bias"),
        (dict(score_function="sigmoid", expert_bias=np.zeros(15, np.float32)), ValueError, "expert_bias"),
        (dict(score_function="sigmoid", expert_bias=np.zeros(16, np.float64)), TypeError, "expert_bias"),
        (dict(score_function="sigmoid", expert_bias=[0.0] * 16), TypeError, "expert_bias"),
        (dict(index_dtype="uint32"), TypeError, "index_dtype"),
        (dict(index_dtype="float32"), TypeError, "index_dtype"),
        (dict(index_dtype="int33"), TypeError, "index_dtype"),
        (dict(scaling_factor=float("nan")), ValueError, "scaling_factor"),
        (dict(scaling_factor="2"), ValueError, "scaling_factor"),
        (dict(out=(np.empty((4, 2), np.float32),)), TypeError, "out"),
        (dict(out=(np.empty((4, 3), np.float32), np.empty((4, 2), np.int32))), ValueError, "out[0]"),
        (dict(out=(np.empty((4, 2), np.float64), np.empty((4, 2), np.int32))), TypeError, "out[0]"),
        (dict(out=(np.empty((4, 2), np.float32), np.empty((4, 2), np.int64)), index_dtype="int32"), TypeError,
         "out[1]"),
        (dict(out=(None, np.empty((4, 2), np.float32))), TypeError, "out[1]"),
        (dict(out=(None, np.empty((4, 2, 2), np.int32)[:, :, 0].T)), ValueError, "out[1]"),
        (dict(variant="nope"), ValueError, "variant"),
        (dict(variant="naive"), ValueError, "backend"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, words):
    kwargs = {"topk": 2, **kwargs}
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        ds4kern.router_topk(np.ones((4, 16), np.float32), **kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits dtype"):
        ds4kern.router_topk(np.ones((4, 16), np.float64), 2)
    with pytest.raises(TypeError, match="logits dtype"):
        ds4kern.router_topk(np.ones((4, 16), np.int32), 2)
    with pytest.raises(ValueError, match="logits"):
        ds4kern.router_topk(np.array(3.0, np.float32), 1)
    with pytest.raises(ValueError, match="at least one expert"):
        ds4kern.router_topk(np.ones((4, 0), np.float32), 1)
    with pytest.raises(TypeError, match="logits must be"):
        ds4kern.router_topk([[1.0, 2.0]], 1)


@pytest.mark.parametrize("dt,E_bad", [("uint8", 257), ("int16", 32769), ("uint16", 65537)])
def test_narrow_index_limits(dt, E_bad):
    with pytest.raises(ValueError, match=dt):
        ds4kern.router_topk(np.ones((1, E_bad), np.float32), 2, index_dtype=dt)
    w, i = ds4kern.router_topk(np.ones((1, E_bad - 1), np.float32), 2, index_dtype=dt)
    assert i.dtype == np.dtype(dt)


def test_strided_narrow_index_output_fills_capture_slice(rng):
    # a routing-capture style buffer [tokens, layers, k]: each layer writes its strided slice
    T, L, E, k = 50, 3, 256, 6
    buf = np.full((T + 5, L, k), 255, np.uint8)
    ref = []
    for layer in range(L):
        x = rng.standard_normal((T, E)).astype(np.float32)
        w, i = ds4kern.router_topk(x, k, score_function="sigmoid", out=(None, buf[2:2 + T, layer, :]))
        assert i.base is not None and np.shares_memory(i, buf)
        _, i_plain = ds4kern.router_topk(x, k, score_function="sigmoid", index_dtype="int64")
        ref.append(i_plain)
    np.testing.assert_array_equal(buf[2:2 + T].transpose(1, 0, 2), np.stack(ref).astype(np.uint8))
    assert (buf[:2] == 255).all() and (buf[2 + T:] == 255).all()


def test_strided_outputs_with_leading_dims(rng):
    x = rng.standard_normal((4, 5, 64)).astype(np.float32)
    big_w = np.zeros((4, 5, 2, 3), np.float32)
    big_i = np.zeros((4, 5, 3, 7), np.int16)
    w, i = ds4kern.router_topk(x, 3, score_function="sqrtsoftplus", out=(big_w[:, :, 1, :], big_i[:, :, :, 2]))
    w2, i2 = ds4kern.router_topk(x, 3, score_function="sqrtsoftplus")
    np.testing.assert_array_equal(big_i[:, :, :, 2], i2)
    np.testing.assert_array_equal(big_w[:, :, 1, :], w2)
    assert (big_w[:, :, 0, :] == 0).all()


def test_largest_spec_shape_reference(rng):
    # the benchmark's largest problem, on the CPU, checked on a sample of rows in float64
    x = rng.standard_normal((65536, 256)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(256)).astype(np.float32)
    w, i = ds4kern.router_topk(x, 6, score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5)
    rows = rng.choice(65536, 500, replace=False)
    w64, i64, sel = router_topk64(x[rows], 6, "sqrtsoftplus", False, bias, 1.5)
    cmp = compare_router(w[rows], i[rows], w64, i64, sel, *router_tolerances(256))
    assert cmp.ok, cmp


GROUP_CASES = [(256, 8, 8, 4), (32, 4, 8, 4), (128, 16, 8, 4), (1024, 32, 8, 4), (130, 6, 13, 3), (64, 8, 1, 1),
               (64, 8, 8, 8)]


@pytest.mark.parametrize("E,k,G,gt", GROUP_CASES)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_group_limited_matches_float64(E, k, G, gt, mode, rng):
    mode = dict(mode)
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32) if mode.pop("bias", False) else None
    x = (rng.standard_normal((53, E)) * 2).astype(np.float32)
    w, i = ds4kern.router_topk(x, k, expert_bias=bias, scaling_factor=2.5, num_groups=G, group_topk=gt, **mode)
    w64, i64, sel = router_topk64(x, k, mode["score_function"], mode.get("use_pre_softmax", False), bias, 2.5,
                                  num_groups=G, group_topk=gt)
    cmp = compare_router(w, i, w64, i64, sel, *router_tolerances(E))
    if not cmp.ok and cmp.weight_ok:
        # a row may keep another group where two group sums tie within float32 rounding (float64
        # orders them); every other row must match
        near = group_tie_rows(i, i64, router_scores64(x, mode["score_function"], mode.get("use_pre_softmax", False),
                                                      bias)[0], k, G, gt)
        rest = sorted(set(cmp.bad_set_rows + cmp.bad_order_rows) - near)
        assert not rest and len(near) <= 2, (cmp, rest, sorted(near))
    else:
        assert cmp.ok, cmp
    # every chosen expert lies in one of at most group_topk groups
    assert (np.array([len(set((row // (E // G)).tolist())) for row in i]) <= gt).all()


def test_group_limited_differs_from_plain_and_g1_is_plain(rng):
    x = rng.standard_normal((200, 64)).astype(np.float32)
    _, plain = ds4kern.router_topk(x, 8, score_function="sigmoid")
    _, one = ds4kern.router_topk(x, 8, score_function="sigmoid", num_groups=1, group_topk=1)
    np.testing.assert_array_equal(plain, one)
    _, grp = ds4kern.router_topk(x, 8, score_function="sigmoid", num_groups=8, group_topk=2)
    assert (plain != grp).any()


@pytest.mark.parametrize("kw,exc,word", [
    (dict(num_groups=8), ValueError, "group_topk"),
    (dict(group_topk=2), ValueError, "num_groups"),
    (dict(num_groups=5, group_topk=1), ValueError, "divide E"),
    (dict(num_groups=8, group_topk=4), ValueError, "divide topk"),
    (dict(num_groups=2, group_topk=4, topk=8), ValueError, "<= num_groups"),
    (dict(num_groups=16, group_topk=1, topk=8), ValueError, "experts per group"),
    (dict(num_groups=0, group_topk=1), ValueError, "num_groups"),
    (dict(num_groups=8.0, group_topk=2), TypeError, "num_groups"),
])
def test_group_validation(kw, exc, word):
    kw = {"topk": 6, **kw}
    with pytest.raises(exc, match=word):
        ds4kern.router_topk(np.ones((3, 64), np.float32), **kw)


def test_torch_cpu_tensors_run_the_reference(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((5, 7, 64)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(64)).astype(np.float32)
    w, i = ds4kern.router_topk(torch.from_numpy(x), 6, score_function="sqrtsoftplus",
                               expert_bias=torch.from_numpy(bias), index_dtype="int64")
    assert isinstance(w, torch.Tensor) and isinstance(i, torch.Tensor) and i.dtype == torch.int64
    w_np, i_np = ds4kern.router_topk(x, 6, score_function="sqrtsoftplus", expert_bias=bias, index_dtype="int64")
    np.testing.assert_array_equal(i.numpy(), i_np)
    np.testing.assert_array_equal(w.numpy(), w_np)
    # bfloat16 CPU tensors too
    tb = torch.from_numpy(x).to(torch.bfloat16)
    _, ib = ds4kern.router_topk(tb, 6, score_function="sigmoid")
    _, ib_np = ds4kern.router_topk(tb.float().numpy(), 6, score_function="sigmoid")
    np.testing.assert_array_equal(ib.numpy(), ib_np)


def test_compare_router_infinite_scores_quietly():
    """compare_router on rows whose selected scores are equal infinities (or NaN): in order, no
    RuntimeWarning from inf - inf; a rising pair is still caught."""
    import warnings

    sel = np.array([[np.inf, np.inf, 1.0, -np.inf], [np.nan, -np.inf, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    i = np.array([[0, 1], [3, 2], [2, 3]])  # row 2: 3.0 then 4.0 rises
    w = np.full((3, 2), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmp = compare_router(w, i, w, i, sel, 1e-6, 1e-6)
    assert cmp.bad_order_rows == [2] and cmp.bad_set_rows == []
