"""router_hash (hash-routed layers): reference against a float64 formulation, validation, and
the CUDA variant against the reference (GPU)."""

import numpy as np
import pytest
import scipy.special as sps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
from ds4kern.core.arrays import BFLOAT16


def hash64(x, table, ids, sf, scaling):
    idx = table[ids]
    v = np.take_along_axis(np.asarray(x, np.float64), idx, 1)
    s = sps.expit(v) if sf == "sigmoid" else np.sqrt(np.logaddexp(0.0, v))
    if idx.shape[1] > 1:
        s = s / (s.sum(1, keepdims=True) + 1e-20)
    return s * scaling, idx


def make(rng, T, E, k, vocab=1000, dtype=np.float32):
    x = (2 * rng.standard_normal((T, E))).astype(dtype)
    table = np.stack([rng.permutation(E)[:k] for _ in range(vocab)]).astype(np.int32)
    ids = rng.integers(0, vocab, T).astype(np.int64)
    return x, table, ids


@pytest.mark.parametrize("sf", ["sqrtsoftplus", "sigmoid"])
@pytest.mark.parametrize("E,k", [(8, 1), (256, 6), (384, 6), (130, 40)])
def test_reference_matches_float64(rng, sf, E, k):
    x, table, ids = make(rng, 97, E, k)
    w, i = ds4kern.router_hash(x, table, ids, score_function=sf, scaling_factor=1.5)
    w64, i64 = hash64(x, table, ids, sf, 1.5)
    np.testing.assert_array_equal(i, i64)
    np.testing.assert_allclose(w, w64, rtol=2e-6, atol=1e-7)


def test_leading_dims_and_capture_slice(rng):
    x, table, ids = make(rng, 24, 64, 4)
    buf = np.zeros((30, 2, 4), np.uint8)
    w, i = ds4kern.router_hash(x.reshape(2, 12, 64), table, ids.reshape(2, 12).astype(np.int32))
    assert w.shape == (2, 12, 4) and i.dtype == np.int32
    ds4kern.router_hash(x, table, ids, out=(None, buf[3:27, 1, :]))
    np.testing.assert_array_equal(buf[3:27, 1, :], table[ids])


@pytest.mark.parametrize("bad,exc,word", [
    (dict(table_val=64), ValueError, "tid2eid"),
    (dict(table_val=-1), ValueError, "tid2eid"),
    (dict(id_val=1000), ValueError, "token_ids"),
    (dict(id_val=-3), ValueError, "token_ids"),
    (dict(table_dtype=np.int64), TypeError, "tid2eid"),
    (dict(ids_dtype=np.float32), TypeError, "token_ids"),
    (dict(ids_shape=(5,)), ValueError, "token_ids"),
    (dict(score_function="softmax"), ValueError, "score_function"),
    (dict(table_k=65), ValueError, "tid2eid"),
])
def test_validation(rng, bad, exc, word):
    x, table, ids = make(rng, 10, 64, 4)
    if "table_val" in bad:
        table[3, 1] = bad["table_val"]
    if "id_val" in bad:
        ids[2] = bad["id_val"]
    if "table_dtype" in bad:
        table = table.astype(bad["table_dtype"])
    if "ids_dtype" in bad:
        ids = ids.astype(bad["ids_dtype"])
    if "ids_shape" in bad:
        ids = ids[:5]
    if "table_k" in bad:
        table = np.zeros((10, bad["table_k"]), np.int32)
    with pytest.raises(exc, match=word):
        ds4kern.router_hash(x, table, ids, score_function=bad.get("score_function", "sqrtsoftplus"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16])
@pytest.mark.parametrize("index_dtype", ["uint8", "int32", "int64"])
def test_gpu_equals_reference(cp, rng, dtype, index_dtype):
    for E, k in ((256, 6), (130, 40), (16, 1)):
        x, table, ids = make(rng, 1001, E, k, dtype=dtype)
        w_ref, i_ref = ds4kern.router_hash(x, table, ids, scaling_factor=2.5, index_dtype=index_dtype)
        w_d = cp.full((1001, k), cp.nan, cp.float32)
        i_d = cp.full((1001, k), 77, index_dtype)
        ds4kern.router_hash(cp.asarray(x), cp.asarray(table), cp.asarray(ids.astype(np.int32)),
                            scaling_factor=2.5, out=(w_d, i_d))
        np.testing.assert_array_equal(cp.asnumpy(i_d), i_ref)
        np.testing.assert_allclose(cp.asnumpy(w_d), w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_out_of_range_reported_not_dereferenced(cp, rng):
    x, clean, ids = make(rng, 64, 256, 6)
    table = clean.copy()
    table[5, 2] = 999       # bad entry
    ids[7] = 10 ** 9        # bad id (all 6 entries of that token)
    ids[9] = -1
    errors = cp.zeros(1, cp.int32)
    w, i = ds4kern.router_hash(cp.asarray(x), cp.asarray(table), cp.asarray(ids), errors=errors)
    w, i = cp.asnumpy(w), cp.asnumpy(i)
    bad_rows = {7, 9} | set(np.nonzero(ids == 5)[0].tolist())
    assert int(errors[0]) == 12 + 1 * int((ids == 5).sum())
    for t in range(64):
        assert np.isnan(w[t]).all() == (t in bad_rows)
    assert (i[7] == 0).all() and (i[9] == 0).all()
    good = [t for t in range(64) if t not in bad_rows]
    w_ref, i_ref = ds4kern.router_hash(x[good], clean, ids[good])
    np.testing.assert_allclose(w[good], w_ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.integers(1, 3000), st.sampled_from([8, 64, 130, 256, 384]), st.integers(1, 8),
       st.sampled_from(["sqrtsoftplus", "sigmoid"]), st.sampled_from(["float32", "float16", "bfloat16"]),
       st.sampled_from(["contiguous", "offset", "strided"]), st.integers(0, 2**31 - 1))
@pytest.mark.gpu
def test_property_every_supported_variant(cp, T, E, k, sf, dtype, layout, seed):
    """Random problems and layouts of the logits: every CUDA variant the registry says supports
    the problem equals the reference (derandomised: a failure reproduces from its test id)."""
    from conftest import supported_variants
    from test_router_property import device_logits

    rng = np.random.default_rng(seed)
    x, table, ids = make(rng, T, E, min(k, E), dtype={"float32": np.float32, "float16": np.float16,
                                                        "bfloat16": BFLOAT16}[dtype])
    w_r, i_r = ds4kern.router_hash(x, table, ids, score_function=sf, scaling_factor=1.5)
    x_d = device_logits(cp, x, layout, 5)
    names = supported_variants("router_hash", x_d, cp.asarray(table), cp.asarray(ids), score_function=sf)
    assert names
    for name in names:
        w = cp.full((T, table.shape[1]), cp.nan, cp.float32)
        i = cp.full((T, table.shape[1]), -1, cp.int32)
        ds4kern.router_hash(x_d, cp.asarray(table), cp.asarray(ids), score_function=sf, scaling_factor=1.5,
                            out=(w, i), variant=name)
        np.testing.assert_array_equal(cp.asnumpy(i), i_r)
        np.testing.assert_allclose(cp.asnumpy(w), w_r, rtol=4e-6, atol=1e-7)
