"""grouped_linear (rows grouped by expert times each group's matrix): the reference against float64,
validation, and on the GPU every variant against float64 with poisoned outputs, a dense Flash-size
projection, the grouped wo_a shape and CUDA-graph capture of the grouped variant."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16

POISON = 0x7FC1  # a bf16 NaN payload no kernel writes


def case(rng, counts, O, I):
    E = len(counts)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = rng.standard_normal((int(off[-1]) + 3, I)).astype(BFLOAT16)  # 3 rows beyond offsets[E]
    w = (rng.standard_normal((E, O, I)) / np.sqrt(I)).astype(BFLOAT16)
    return x, off, w


def want(x, off, w):
    y = np.zeros((x.shape[0], w.shape[1]))
    for e in range(w.shape[0]):
        lo, hi = off[e], off[e + 1]
        y[lo:hi] = x[lo:hi].astype(np.float64) @ w[e].astype(np.float64).T
    return y


@pytest.mark.parametrize("counts", [[5], [3, 0, 7, 1], [0, 0], [1] * 9])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_reference_matches_float64(counts, out_dtype):
    rng = np.random.default_rng(len(counts))
    x, off, w = case(rng, counts, 64, 96)
    y = ds4kern.grouped_linear(x, off, w, out_dtype=out_dtype)
    n = off[-1]
    tol = 1e-5 if out_dtype == "float32" else 1e-2
    ref = want(x, off, w)
    np.testing.assert_allclose(y[:n].astype(np.float64), ref[:n], rtol=tol, atol=tol * max(1, np.abs(ref).max()))
    assert not y[n:].astype(np.float64).any()


@pytest.mark.parametrize("args,kw,match", [
    (lambda x, o, w: (x.astype(np.float32), o, w), {}, "x must be bfloat16"),
    (lambda x, o, w: (x, o, w[:, :, :8]), {}, r"w must have shape \[E, O, I\]"),
    (lambda x, o, w: (x, o[:-1], w), {}, r"offsets must have shape \[E \+ 1\]"),
    (lambda x, o, w: (x, o.astype(np.float32), w), {}, "offsets must be int32 or int64"),
    (lambda x, o, w: (x, o[::-1].copy(), w), {}, "offsets"),
    (lambda x, o, w: (x, o, w), {"out_dtype": "int8"}, "out_dtype must be"),
    (lambda x, o, w: (x, o, w), {"out": np.zeros((2, 2), np.float32)}, "out must be C-contiguous of shape"),
])
def test_validation_names_the_argument(args, kw, match):
    x, off, w = case(np.random.default_rng(0), [2, 3], 64, 64)
    with pytest.raises((TypeError, ValueError), match=match):
        ds4kern.grouped_linear(*args(x, off, w), **kw)


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("counts,O,I", [([7], 64, 64), ([3, 0, 9, 33, 1], 128, 192), ([1] * 8, 1024, 4096),
                                        ([100, 64, 1], 512, 256)])
@pytest.mark.parametrize("variant", ["naive", "grouped"])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_variants_match_float64(counts, O, I, variant, out_dtype):
    import cupy as cp
    rng = np.random.default_rng(O + I)
    x, off, w = case(rng, counts, O, I)
    dt = np.float32 if out_dtype == "float32" else BFLOAT16
    out = cp.empty((x.shape[0], O), dt)
    out.view(np.uint16 if dt is BFLOAT16 else np.uint32).fill(POISON if dt is BFLOAT16 else 0x7FC00001)
    ds4kern.grouped_linear(cp.asarray(x), cp.asarray(off), cp.asarray(w), out=out, variant=variant)
    got = cp.asnumpy(out).astype(np.float64)
    n = off[-1]
    ref = want(x, off, w)[:n]
    assert not np.isnan(got[:n]).any(), "rows left unwritten"
    err = np.linalg.norm(got[:n] - ref) / np.linalg.norm(ref)
    assert err < (1e-5 if out_dtype == "float32" else 5e-3), err
    assert np.isnan(got[n:]).all(), "rows beyond offsets[E] were written"


@pytest.mark.gpu
def test_grouped_is_capturable_and_one_launch():
    import cupy as cp
    from graph_nodes import count_kernel_nodes
    rng = np.random.default_rng(3)
    x, off, w = case(rng, [64], 4096, 1024)
    xd, od, wd = cp.asarray(x), cp.asarray(off), cp.asarray(w)
    out = cp.empty((x.shape[0], 4096), np.float32)
    assert count_kernel_nodes(cp, lambda: ds4kern.grouped_linear(xd, od, wd, out=out, variant="grouped")) == 1
    ref = want(x, off, w)[:64]
    assert np.linalg.norm(cp.asnumpy(out)[:64] - ref) / np.linalg.norm(ref) < 1e-5
