"""router_topk's reference backend: numpy, float32 arithmetic as in the kernels; the oracle of
the GPU tests (``checks.py`` holds the independent float64 formulation)."""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-20)

__all__ = ["order_keys", "topk_by_key", "score", "group_limit", "reference_router_topk", "EPS"]


def order_keys(s: np.ndarray) -> np.ndarray:
    """uint32 selection keys with the same total order as ``ds4_order_key`` in common.cuh."""
    s = np.asarray(s, dtype=np.float32)
    s = np.where(s == 0, np.float32(0), s)  # fold -0 onto +0
    u = s.view(np.uint32)
    key = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)
    key[np.isnan(s)] = 1
    return key


def topk_by_key(sel: np.ndarray, k: int) -> np.ndarray:
    """Indices [T, k] of the k largest selection scores per row; ties by ascending index."""
    T, E = sel.shape
    comb = (order_keys(sel).astype(np.uint64) << np.uint64(32)) | (
        np.uint64(0xFFFFFFFF) - np.arange(E, dtype=np.uint64))
    part = np.argpartition(comb, E - k, axis=1)[:, E - k:] if k < E else np.broadcast_to(np.arange(E), (T, E))
    vals = np.take_along_axis(comb, part, axis=1)
    order = np.argsort(vals, axis=1)[:, ::-1]  # the combined values are unique
    return np.take_along_axis(part, order, axis=1)


def score(x: np.ndarray, score_function: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        if score_function == "sigmoid":
            return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
        sp = np.where(x > np.float32(20), x, np.log1p(np.exp(x)))
        return np.sqrt(sp).astype(np.float32)


def group_limit(sel: np.ndarray, k: int, num_groups: int, group_topk: int) -> np.ndarray:
    """Selection scores with every expert outside the top ``group_topk`` groups set to -inf.

    Group score: the group's top ``k // group_topk`` selection scores (same order and tie rule
    as the selection), added in descending order in float32.
    """
    T, E = sel.shape
    gs, m = E // num_groups, k // group_topk
    flat = sel.reshape(T * num_groups, gs)
    top = np.take_along_axis(flat, topk_by_key(flat, m), axis=1)
    gscore = top[:, 0].copy()
    for j in range(1, m):
        gscore = (gscore + top[:, j]).astype(np.float32)
    keep = topk_by_key(gscore.reshape(T, num_groups), group_topk)
    mask = np.zeros((T, num_groups), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return np.where(np.repeat(mask, gs, axis=1), sel, np.float32(-np.inf)).astype(np.float32)


def reference_router_topk(logits, k, score_function, use_pre_softmax, expert_bias, scaling_factor,
                          num_groups=0, group_topk=0):
    """The reference computation on host arrays: returns (weights float32 [T,k], indices int64)."""
    x = np.asarray(logits).astype(np.float32)
    scale = np.float32(scaling_factor)

    def select(sel):
        return topk_by_key(group_limit(sel, k, num_groups, group_topk) if num_groups else sel, k)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if score_function == "softmax" and use_pre_softmax:
            mx = np.max(x, axis=1, keepdims=True)
            s = np.exp(x - mx)
            s = (s / s.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float32)
            idx = select(s)
            w = np.take_along_axis(s, idx, axis=1)
        elif score_function == "softmax":
            idx = select(x)
            xs = np.take_along_axis(x, idx, axis=1)
            v = np.exp(xs - xs[:, :1])
            w = v / v.sum(axis=1, keepdims=True, dtype=np.float32)
        else:
            s = score(x, score_function)
            sel = s if expert_bias is None else s + np.asarray(expert_bias, np.float32)
            idx = select(sel)
            w = np.take_along_axis(s, idx, axis=1)
            if k > 1:
                w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + EPS)
        w = (w * scale).astype(np.float32)
    return w, idx
