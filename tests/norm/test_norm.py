"""rms_norm and rope_rotate: the references against float64, validation, and on the GPU the CUDA
variants against the references (poisoned outputs, strided rows, every dtype, bad positions
counted) plus a property test over every variant the registry says can run a problem."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.rope import rope_table

DT = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}


def rms64(x, w, eps):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y if w is None else y * np.asarray(w, np.float64)


def rope64(x, c, s, pos, start, inverse=False):
    x = np.asarray(x, np.float64).copy()
    c, s = np.asarray(c, np.float64)[pos], np.asarray(s, np.float64)[pos] * (-1 if inverse else 1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (32,)
    c, s = c.reshape(shape), s.reshape(shape)
    seg = x[..., start:start + 64]
    x0, x1 = seg[..., 0::2].copy(), seg[..., 1::2].copy()
    seg[..., 0::2] = x0 * c - x1 * s
    seg[..., 1::2] = x0 * s + x1 * c
    return x


@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 512), (1, 7), (0, 64), (4, 7168)])
@pytest.mark.parametrize("dtype", sorted(DT))
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_reference(shape, dtype, weighted):
    rng = np.random.default_rng(len(shape))
    x = (3 * rng.standard_normal(shape)).astype(DT[dtype])
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32) if weighted else None
    y = ds4kern.rms_norm(x, w, eps=1e-6)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, rms64(x, w, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("H", [None, 4])
@pytest.mark.parametrize("start", [None, 0, 64])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_reference(H, start, inverse):
    rng = np.random.default_rng(3)
    c, s = rope_table(300, 64, 10000.0)
    shape = (6, 128) if H is None else (6, H, 128)
    x = rng.standard_normal(shape).astype(np.float32)
    pos = rng.integers(0, 300, 6)
    want = rope64(x, c, s, pos, 64 if start is None else start, inverse)
    got = ds4kern.rope_rotate(x, c, s, pos, start=start, inverse=inverse)
    assert got is x
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda x, c, s: ds4kern.rms_norm(x.astype(np.int32)), "x must be float32"),
    (lambda x, c, s: ds4kern.rms_norm(x, np.ones(3, np.float32)), r"weight must be float32 of shape \[D\]"),
    (lambda x, c, s: ds4kern.rms_norm(x, eps=-1.0), "eps must be >= 0"),
    (lambda x, c, s: ds4kern.rms_norm(x, out_dtype="int8"), "out_dtype must be"),
    (lambda x, c, s: ds4kern.rope_rotate(x[:, :32].copy(), c, s, np.zeros(4, np.int64)), "d >= 64"),
    (lambda x, c, s: ds4kern.rope_rotate(x, c, s, np.zeros(3, np.int64)), r"positions must be integers of shape \[N\]"),
    (lambda x, c, s: ds4kern.rope_rotate(x, c, s, np.full(4, 999)), r"positions must lie in \[0, 300\)"),
    (lambda x, c, s: ds4kern.rope_rotate(x, c, s, np.zeros(4, np.int64), start=3), "start must be an even int"),
    (lambda x, c, s: ds4kern.rope_rotate(x, c[:, :16].copy(), s, np.zeros(4, np.int64)), r"cos must be float32 \[max_pos, 32\]"),
])
def test_validation_names_the_argument(call, match):
    c, s = rope_table(300, 64, 10000.0)
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, c, s)


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 256), (3, 7, 512), (1, 7), (300, 4096), (2, 7168)])
@pytest.mark.parametrize("dtype", sorted(DT))
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_rms_gpu_matches_reference(shape, dtype, out_dtype):
    import cupy as cp
    rng = np.random.default_rng(shape[-1])
    x = (3 * rng.standard_normal(shape)).astype(DT[dtype])
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    out = cp.empty(shape, DT[out_dtype])
    out.view(np.uint16 if out_dtype == "bfloat16" else np.uint32).fill(0x7FC1 if out_dtype == "bfloat16" else 0x7FC00001)
    ds4kern.rms_norm(cp.asarray(x), cp.asarray(w), eps=1e-6, out_dtype=out_dtype, out=out)
    got = cp.asnumpy(out).astype(np.float64)
    assert not np.isnan(got).any(), "elements left unwritten"
    tol = 2e-6 if out_dtype == "float32" else 8e-3
    np.testing.assert_allclose(got, rms64(x, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_rms_gpu_strided_rows():
    import cupy as cp
    rng = np.random.default_rng(1)
    wide = cp.asarray(rng.standard_normal((6, 2, 512)).astype(np.float32))
    x = wide[:, 1]                                   # rows 1024 elements apart
    y = ds4kern.rms_norm(x)
    np.testing.assert_allclose(cp.asnumpy(y), rms64(cp.asnumpy(x), None, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H,d,start", [(1, 512, 448), (64, 512, 448), (64, 128, 64), (3, 64, 0)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_gpu_matches_reference(dtype, H, d, start, inverse):
    import cupy as cp
    rng = np.random.default_rng(H + d)
    c, s = rope_table(1000, 64, 160000.0, yarn_factor=16.0, original_max_pos=256)
    x = rng.standard_normal((9, H, d)).astype(DT[dtype])
    pos = rng.integers(0, 1000, 9)
    want = ds4kern.rope_rotate(x.copy(), c, s, pos, start=start, inverse=inverse)
    xd = cp.asarray(x)
    ds4kern.rope_rotate(xd, cp.asarray(c), cp.asarray(s), cp.asarray(pos), start=start, inverse=inverse)
    tol = 1e-5 if dtype == "float32" else 8e-3
    np.testing.assert_allclose(cp.asnumpy(xd).astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_rope_gpu_bad_positions_skipped_and_counted():
    import cupy as cp
    c, s = rope_table(100, 64, 10000.0)
    x = cp.asarray(np.random.default_rng(2).standard_normal((4, 3, 128)).astype(np.float32))
    before = x.copy()
    err = cp.zeros(1, np.int32)
    ds4kern.rope_rotate(x, cp.asarray(c), cp.asarray(s), cp.asarray(np.array([5, -1, 100, 7])), errors=err)
    assert int(err.get()[0]) == 2
    np.testing.assert_array_equal(cp.asnumpy(x[1:3]), cp.asnumpy(before[1:3]))
    assert not np.array_equal(cp.asnumpy(x[0]), cp.asnumpy(before[0]))


@pytest.mark.gpu
def test_property_every_supported_variant():
    import cupy as cp
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from conftest import supported_variants

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(st.integers(0, 40), st.integers(1, 9000), st.sampled_from(sorted(DT)), st.booleans(),
           st.integers(0, 2 ** 31 - 1))
    def check(N, D, dtype, weighted, seed):
        rng = np.random.default_rng(seed)
        x = (4 * rng.standard_normal((N, D))).astype(DT[dtype])
        w = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32) if weighted else None
        xd, wd = cp.asarray(x), (None if w is None else cp.asarray(w))
        names = supported_variants("rms_norm", xd, wd)
        assert names
        for name in names:
            got = cp.asnumpy(ds4kern.rms_norm(xd, wd, variant=name))
            np.testing.assert_allclose(got, rms64(x, w, 1e-6), rtol=3e-6, atol=3e-6, err_msg=name)

    check()
