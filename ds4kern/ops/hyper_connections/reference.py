"""The hyper-connections' reference backend (numpy, float64 throughout; outputs rounded once to
their dtype).  Semantics: ``shared/spec/hyper_connections.md``."""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16

STREAMS = 4
MIX = 24  # 4 pre | 4 post | 16 comb


def reference_mix(X, hc_fn, hc_scale, hc_base, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20):
    """``(pre [B, 4], post [B, 4], comb [B, 4, 4])`` in float64 for streams ``X [B, 4, D]``."""
    from scipy.special import expit  # (imported on first use: it adds ~0.1 s to import ds4kern)

    x = np.asarray(X).astype(np.float64)
    B = x.shape[0]
    flat = x.reshape(B, -1)
    fn = np.asarray(hc_fn, dtype=np.float64)
    s = np.asarray(hc_scale, dtype=np.float64).reshape(3)
    base = np.asarray(hc_base, dtype=np.float64).reshape(MIX)
    with np.errstate(all="ignore"):
        r = 1.0 / np.sqrt((flat * flat).mean(axis=1) + norm_eps)
        mix = (flat @ fn.T) * r[:, None]
        pre = expit(mix[:, 0:4] * s[0] + base[0:4]) + hc_eps
        post = 2.0 * expit(mix[:, 4:8] * s[1] + base[4:8])
        c = (mix[:, 8:24] * s[2] + base[8:24]).reshape(B, 4, 4)  # c[b, in, out]
        e = np.exp(c - c.max(axis=-1, keepdims=True))
        c = e / e.sum(axis=-1, keepdims=True) + hc_eps
        c = c / (c.sum(axis=-2, keepdims=True) + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            c = c / (c.sum(axis=-1, keepdims=True) + hc_eps)
            c = c / (c.sum(axis=-2, keepdims=True) + hc_eps)
    return pre, post, c


def combine_pre(X, pre):
    """``x_in = sum_h pre[:, h] X[:, h]`` in float64 (rounded by the caller)."""
    with np.errstate(all="ignore"):
        return (pre[:, :, None] * np.asarray(X).astype(np.float64)).sum(axis=1)


def reference_hc_pre(X, hc_fn, hc_scale, hc_base, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20):
    """``(x_in bf16 [B, D], post float32 [B, 4], comb float32 [B, 4, 4])``."""
    pre, post, comb = reference_mix(X, hc_fn, hc_scale, hc_base, norm_eps, hc_eps, sinkhorn_iters)
    return combine_pre(X, pre).astype(BFLOAT16), post.astype(np.float32), comb.astype(np.float32)


def reference_hc_post(y, X, post, comb, dtype=None):
    """``X_new [B, 4, D]`` in ``dtype`` (default X's): ``post[j] * y + sum_i comb[i, j] X[i]``."""
    x = np.asarray(X).astype(np.float64)
    with np.errstate(all="ignore"):
        new = (np.asarray(post, dtype=np.float64)[:, :, None] * np.asarray(y).astype(np.float64)[:, None, :]
               + np.einsum("bij,bid->bjd", np.asarray(comb, dtype=np.float64), x))
    return new.astype(np.asarray(X).dtype if dtype is None else dtype)


# -- variant functions (fill the preallocated outputs of the op's argument object) ---------


def reference_pre_variant(a) -> None:
    x_in, post, comb = reference_hc_pre(a.X, a.hc_fn, a.scale_values(), a.hc_base, a.norm_eps, a.hc_eps, a.iters)
    a.x_in[...] = x_in
    a.post[...] = post
    a.comb[...] = comb


def reference_post_variant(a) -> None:
    a.X_new[...] = reference_hc_post(a.y, a.X, a.post_in, a.comb_in)


def reference_post_pre_variant(a) -> None:
    new = reference_hc_post(a.y, a.X, a.post_in, a.comb_in)  # rounded to X's dtype, as hc_pre would read it
    x_in, post, comb = reference_hc_pre(new, a.hc_fn, a.scale_values(), a.hc_base, a.norm_eps, a.hc_eps, a.iters)
    a.X_new[...] = new
    a.x_in[...] = x_in
    a.post[...] = post
    a.comb[...] = comb
