"""Inputs of indexer_topk tests and an independent float64 formulation of its logits.

``make_case`` draws random inputs for one problem: T tokens, B = T sequences (decode) or B = 1
(shared: the tokens of one sequence), C columns, bf16 or fp8 keys (e4m3 codes of normal values
times a per-row float32 scale), contiguous or paged (the same keys scattered over shuffled pages
of a larger pool, with unused pages filled with garbage and unread block-table entries -1).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ds4kern.core.arrays import BFLOAT16

H, D, PAGE = 64, 128, 64


def e4m3_codes(x) -> np.ndarray:
    """uint8 e4m3 codes of float values (ml_dtypes rounding; |x| is kept below 448)."""
    return np.clip(np.asarray(x, np.float32), -440, 440).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def decode_e4m3(codes) -> np.ndarray:
    """float64 values of e4m3 codes through ml_dtypes (not the reference's table)."""
    return np.asarray(codes, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def make_lengths(rng, T: int, C: int, k: int, shared: bool) -> np.ndarray:
    """Random lengths in [0, C] with the edges: C, 0 and k - 1 (fewer than k) when T allows; shared
    keys (prefill) get the causal pattern of a chunk ending at the last column, (pos + 1) // 4."""
    if shared and T > 1:
        pos = 4 * C - 1 - (T - 1 - np.arange(T)) * max(1, (4 * C) // (2 * T))
        n = np.clip((pos + 1) // 4, 0, C)
    else:
        n = rng.integers(0, C + 1, T)
    n[-1] = C
    if T > 2:
        n[0] = 0
        n[1] = min(C, max(k - 1, 0))
    return n.astype(np.int32)


def make_case(rng, T: int, C: int, k: int, fmt: str = "bf16", paged: bool = False, shared: bool = False,
              lengths=None) -> dict:
    B = 1 if shared else T
    q = rng.standard_normal((T, H, D)).astype(BFLOAT16)
    w = rng.standard_normal((T, H)).astype(np.float32)
    if fmt == "fp8":
        keys = e4m3_codes(rng.standard_normal((B, C, D)) * 64.0)
        scales = (rng.uniform(0.5, 2.0, (B, C)) / 64.0).astype(np.float32)
    else:
        keys = rng.standard_normal((B, C, D)).astype(BFLOAT16)
        scales = None
    n = make_lengths(rng, T, C, k, shared) if lengths is None else np.asarray(lengths, np.int32)
    case = dict(q=q, w=w, keys=keys, key_scales=scales, lengths=n, key_format=fmt, block_table=None, C=C)
    return to_paged(rng, case) if paged else case


def to_paged(rng, case: dict) -> dict:
    """The same keys in 64-row pages: sequence b's page j goes to a shuffled page of a pool with
    spare pages (garbage); block-table entries no token reads are -1."""
    keys, scales, n = case["keys"], case["key_scales"], case["lengths"]
    B, C = keys.shape[:2]
    max_pages = max(1, -(-C // PAGE))
    pages = B * max_pages + 3
    perm = rng.permutation(pages)[:B * max_pages].reshape(B, max_pages).astype(np.int32)
    pool = np.zeros((pages, PAGE, D), keys.dtype)
    pool[...] = (rng.integers(0, 120, pool.shape).astype(np.uint8) if keys.dtype == np.uint8
                 else rng.standard_normal(pool.shape).astype(BFLOAT16) * 100)
    pscale = None if scales is None else rng.uniform(1, 2, (pages, PAGE)).astype(np.float32)
    for b in range(B):
        for j in range(max_pages):
            c0, c1 = j * PAGE, min(C, j * PAGE + PAGE)
            if c1 > c0:
                pool[perm[b, j], :c1 - c0] = keys[b, c0:c1]
                if pscale is not None:
                    pscale[perm[b, j], :c1 - c0] = scales[b, c0:c1]
    seq = np.arange(len(n)) if B == len(n) else np.zeros(len(n), int)
    need = np.zeros(B, int)
    np.maximum.at(need, seq, -(-n.astype(int) // PAGE))
    bt = perm.copy()
    bt[np.arange(max_pages)[None, :] >= need[:, None]] = -1
    out = dict(case, keys=pool, key_scales=pscale, block_table=bt)
    out["contiguous"] = case
    return out


def kwargs(case: dict) -> dict:
    """Keyword arguments of indexer_topk for a case (lengths included)."""
    kw = dict(lengths=case["lengths"], key_format=case["key_format"])
    if case["key_scales"] is not None:
        kw["key_scales"] = case["key_scales"]
    if case["block_table"] is not None:
        kw["block_table"] = case["block_table"]
    return kw


def dense_logits(case: dict) -> np.ndarray:
    """Independent float64 logits ``[T, C]`` of a contiguous case: keys decoded with ml_dtypes,
    one einsum over every (token, head, column), relu, the weighted head sum, -inf beyond lengths."""
    c = case.get("contiguous", case)
    keys = c["keys"]
    K = decode_e4m3(keys) * c["key_scales"].astype(np.float64)[..., None] if c["key_format"] == "fp8" \
        else keys.astype(np.float64)
    T = c["q"].shape[0]
    Kt = K if K.shape[0] == T else np.broadcast_to(K, (T,) + K.shape[1:])
    S = np.einsum("thd,tcd->thc", c["q"].astype(np.float64), Kt)
    L = np.einsum("th,thc->tc", c["w"].astype(np.float64), np.maximum(S, 0.0))
    L[np.arange(L.shape[1])[None, :] >= c["lengths"][:, None]] = -np.inf
    return L


def dense_topk(logits64: np.ndarray, k: int, lengths) -> np.ndarray:
    """Top-k of the float32-rounded logits by a stable sort (descending, lower column first)."""
    L = logits64.astype(np.float32)
    T, C = L.shape
    out = np.full((T, k), -1, np.int32)
    for t in range(T):
        n = int(lengths[t])
        order = sorted(range(n), key=lambda c: (-float(L[t, c]), c))[:k]
        out[t, :len(order)] = order
    return out
