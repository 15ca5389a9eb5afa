"""The KV compressor's reference backend (numpy): float32 state as in the kernels, float64
pool / RMSNorm / RoPE."""

from __future__ import annotations

import numpy as np

ROPE_DIM = 64  # rotated channels: the last 64 of d


def _pool64(K, S):
    """Per channel softmax(S over rows) . K in float64; windows of only -inf scores give 0."""
    S64 = S.astype(np.float64)
    m = S64.max(axis=1, keepdims=True)
    dead = m == -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(S64 - np.where(dead, 0.0, m))
        l = e.sum(axis=1)
        o = (e * K.astype(np.float64)).sum(axis=1)
        return np.where(l > 0, o / np.where(l > 0, l, 1.0), 0.0)



def _finish64(c, norm_w, eps, rope_cos, rope_sin, rope_pos):
    """RMSNorm then interleaved RoPE on the last 64 channels, float64; ``c`` is [n, d]."""
    with np.errstate(invalid="ignore", over="ignore"):
        y = c / np.sqrt((c * c).mean(axis=1, keepdims=True) + eps) * norm_w.astype(np.float64)
        cs = rope_cos[rope_pos].astype(np.float64)
        sn = rope_sin[rope_pos].astype(np.float64)
        x0, x1 = y[:, -ROPE_DIM::2].copy(), y[:, -ROPE_DIM + 1::2].copy()
        y[:, -ROPE_DIM::2] = x0 * cs - x1 * sn
        y[:, -ROPE_DIM + 1::2] = x0 * sn + x1 * cs
    return y



def reference_decode_step(kv, score, ape, norm_w, positions, rope_cos, rope_sin, kv_state, score_state, cache,
                          ratio, eps=1e-6):
    """One decode step on numpy arrays, in place (the spec's pseudo-code, vectorised over B)."""
    R, d = ratio, norm_w.shape[0]
    B = kv.shape[0]
    if B == 0:
        return
    p = np.asarray(positions, dtype=np.int64)
    r = p % R
    sc = (score.astype(np.float32) + ape[r]).astype(np.float32)
    rows = R + r if R == 4 else r
    bi = np.arange(B)
    kv_state[bi, rows] = kv.astype(np.float32)
    score_state[bi, rows] = sc
    em = np.nonzero((p + 1) % R == 0)[0]
    if em.size == 0:
        return
    if R == 4:
        K = np.concatenate([kv_state[em, 0:4, :d], kv_state[em, 4:8, d:]], axis=1)
        S = np.concatenate([score_state[em, 0:4, :d], score_state[em, 4:8, d:]], axis=1)
        kv_state[em, 0:4] = kv_state[em, 4:8]
        score_state[em, 0:4] = score_state[em, 4:8]
    else:
        K, S = kv_state[em], score_state[em]
    c = _finish64(_pool64(K, S), norm_w, eps, rope_cos, rope_sin, p[em] + 1 - R)
    cache[em, p[em] // R] = c.astype(cache.dtype)



def reference_decode(a) -> None:
    reference_decode_step(a.kv, a.score, a.ape, a.norm_w, a.positions, a.rope_cos, a.rope_sin, a.kv_state,
                          a.score_state, a.cache, a.ratio, a.eps)



def reference_prefill(a) -> None:
    """Token by token through the decode step: prefill == decode steps by construction."""
    B, S = a.kv.shape[:2]
    start = (np.asarray(a.positions, dtype=np.int64) if a.positions is not None
             else np.full(B, a.start, np.int64))
    for t in range(S):
        reference_decode_step(a.kv[:, t], a.score[:, t], a.ape, a.norm_w, start + t, a.rope_cos, a.rope_sin,
                              a.kv_state, a.score_state, a.cache, a.ratio, a.eps)
