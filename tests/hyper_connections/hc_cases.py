"""Inputs and an independent float64 formulation shared by the hyper-connection tests.

The loop formulation is written apart from ``ds4kern.ops.hyper_connections.reference``: one token
at a time, one dot product per mix row, ``math.fsum`` for the mean square, scipy's ``expit`` and
``softmax``, the Sinkhorn steps on Python lists."""

import math

import numpy as np
from scipy.special import expit, softmax

from ds4kern.core.arrays import BFLOAT16

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}
EPS = 1e-6
ITERS = 20


def make_inputs(rng, B, D, dtype="float32", y_dtype="bfloat16"):
    """Streams of mixed scale per token, hc_fn scaled so the mix values are of order 1, a base
    that starts comb near the identity (as the model's initialisation does), the previous
    block's post / comb, and a sub-block output y.  Nothing is zero."""
    X = (rng.standard_normal((B, 4, D)) * rng.uniform(0.5, 2.0, (B, 1, 1))).astype(DTYPES[dtype])
    fn = (rng.standard_normal((24, 4 * D)) / math.sqrt(4 * D)).astype(np.float32)
    scale = tuple(float(s) for s in rng.uniform(0.5, 1.5, 3))
    base = 0.5 * rng.standard_normal(24)
    base[8:] += 2.0 * np.eye(4).ravel()
    post = (2.0 * rng.uniform(0.05, 0.95, (B, 4))).astype(np.float32)
    comb = rng.uniform(0.05, 1.0, (B, 4, 4))
    comb = (comb / comb.sum(axis=1, keepdims=True)).astype(np.float32)
    y = rng.standard_normal((B, D)).astype(DTYPES[y_dtype])
    return dict(X=X, hc_fn=fn, hc_scale=scale, hc_base=base.astype(np.float32), y=y, post=post, comb=comb)


def _rows(C, eps):
    return [[C[i][j] / (sum(C[i]) + eps) for j in range(4)] for i in range(4)]


def _cols(C, eps):
    s = [C[0][j] + C[1][j] + C[2][j] + C[3][j] for j in range(4)]
    return [[C[i][j] / (s[j] + eps) for j in range(4)] for i in range(4)]


def loop_pre(X, fn, scale, base, norm_eps=EPS, hc_eps=EPS, iters=ITERS):
    """``(x_in float64 [B, D], post [B, 4], comb [B, 4, 4])``, one token at a time."""
    B, _, D = X.shape
    fn64 = np.asarray(fn, dtype=np.float64)
    x_in = np.empty((B, D))
    post = np.empty((B, 4))
    comb = np.empty((B, 4, 4))
    with np.errstate(all="ignore"):
        for b in range(B):
            streams = [np.asarray(X[b, h], dtype=np.float64) for h in range(4)]
            flat = np.concatenate(streams)
            r = 1.0 / math.sqrt(math.fsum((flat * flat).tolist()) / flat.size + norm_eps)
            mix = [float(np.dot(fn64[k], flat)) * r for k in range(24)]
            pre = [float(expit(mix[h] * scale[0] + base[h])) + hc_eps for h in range(4)]
            post[b] = [2.0 * float(expit(mix[4 + h] * scale[1] + base[4 + h])) for h in range(4)]
            logits = np.array([[mix[8 + 4 * i + j] * scale[2] + base[8 + 4 * i + j] for j in range(4)]
                               for i in range(4)])
            C = (softmax(logits, axis=1) + hc_eps).tolist()
            C = _cols(C, hc_eps)
            for _ in range(iters - 1):
                C = _cols(_rows(C, hc_eps), hc_eps)
            comb[b] = C
            x_in[b] = pre[0] * streams[0] + pre[1] * streams[1] + pre[2] * streams[2] + pre[3] * streams[3]
    return x_in, post, comb


def loop_post(y, X, post, comb):
    """``X_new`` float64 ``[B, 4, D]``, one token and output stream at a time."""
    B, _, D = X.shape
    out = np.empty((B, 4, D))
    for b in range(B):
        yb = np.asarray(y[b], dtype=np.float64)
        for j in range(4):
            acc = float(post[b, j]) * yb
            for i in range(4):
                acc = acc + float(comb[b, i, j]) * np.asarray(X[b, i], dtype=np.float64)
            out[b, j] = acc
    return out


def bf16_close(got, want, atol=1e-5):
    """Within one bf16 rounding step of ``want`` (float64 values rounded once, either way)."""
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=2.0 ** -7, atol=atol)
