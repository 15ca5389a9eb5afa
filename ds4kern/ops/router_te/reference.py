"""The router_te ops' reference backend (numpy, float32 arithmetic as in the kernels)."""

from __future__ import annotations

import numpy as np

from ..router.reference import reference_router_topk, score, topk_by_key


def pack_bitmap(mask: np.ndarray) -> np.ndarray:
    """bool ``[..., E]`` -> uint8 ``[..., ceil(E/8)]``, bit e % 8 of byte e // 8 (LSB first)."""
    return np.packbits(np.asarray(mask, bool), axis=-1, bitorder="little")


def unpack_bitmap(bits: np.ndarray, num_experts: int) -> np.ndarray:
    """uint8 ``[..., ceil(E/8)]`` -> bool ``[..., E]``."""
    return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=num_experts, bitorder="little").astype(bool)


def reference_dense(a) -> None:
    p = a.problem
    x = np.asarray(a.logits).astype(np.float32)
    w, idx = reference_router_topk(x, a.topk, a.score_function, a.use_pre_softmax, a.expert_bias,
                                      a.scaling_factor, p.num_groups, p.group_topk)
    T, E = x.shape
    dense = np.zeros((T, E), np.float32)
    np.put_along_axis(dense, idx, w, axis=1)
    a.probs[...] = dense.astype(a.probs.dtype)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if a.score_function == "softmax" and a.use_pre_softmax:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            inter = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
        elif a.score_function == "softmax":
            inter = np.full((T, E), -np.inf, np.float32)
            xs = np.take_along_axis(x, idx, axis=1)
            v = np.exp(xs - xs[:, :1])
            np.put_along_axis(inter, idx, v / v.sum(axis=1, keepdims=True, dtype=np.float32), axis=1)
        elif a.score_function == "sigmoid":
            inter = score(x, "sigmoid")
        else:
            inter = x
    a.intermediate[...] = inter
    if p.output.startswith("indices"):
        a.routing[...] = idx
    else:
        mask = np.zeros((T, E), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        a.routing[...] = mask if p.output == "bytemap" else pack_bitmap(mask)


def reference_backward(a) -> None:
    T, E = a.grad_probs.shape
    g = np.asarray(a.grad_probs).astype(np.float32) * np.float32(a.scaling_factor)
    act = np.asarray(a.intermediate, np.float32)
    if a.problem.source == "indices":
        mask = np.zeros((T, E), bool)
        ids = np.asarray(a.routing).astype(np.int64)
        ok = (ids >= 0) & (ids < E)  # entries outside [0, E) select nothing
        mask[np.nonzero(ok)[0], ids[ok]] = True
    elif a.problem.source == "bitmap":
        mask = unpack_bitmap(a.routing, E)
    else:
        mask = np.asarray(a.routing, bool)
    eps = np.float32(1e-20)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if a.score_function == "softmax":
            a_sel = np.where(mask, act, np.float32(0))
            gm = np.where(mask, g, np.float32(0))
            dot = (gm * a_sel).sum(axis=1, keepdims=True, dtype=np.float32)
            if a.use_pre_softmax:
                gx = act * (gm - dot)
            else:
                gx = np.where(mask, a_sel * (g - dot), np.float32(0))
        else:
            s = act if a.score_function == "sigmoid" else score(act, "sqrtsoftplus")
            if a.topk > 1:
                s_sel = np.where(mask, s, np.float32(0))
                S = s_sel.sum(axis=1, keepdims=True, dtype=np.float32) + eps
                D = (np.where(mask, g, np.float32(0)) * s_sel).sum(axis=1, keepdims=True, dtype=np.float32)
                gs = np.where(mask, g / S - D / (S * S), np.float32(0))
            else:
                gs = np.where(mask, g, np.float32(0))
            if a.score_function == "sigmoid":
                gx = gs * s * (np.float32(1) - s)
            else:
                x = act
                sig = np.float32(1) / (np.float32(1) + np.exp(-x))
                d = np.where(x > np.float32(20), np.float32(1), sig) / (np.float32(2) * s + eps)
                gx = gs * d
    a.grad_logits[...] = gx.astype(a.grad_logits.dtype)


def aux_normalised(x, sf):
    with np.errstate(over="ignore", invalid="ignore"):
        if sf == "softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
            return p.astype(np.float32), p.astype(np.float32)
        s = score(x, sf)
        p = s / (s.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
        return p.astype(np.float32), (s if sf == "sigmoid" else x)


def reference_aux_scores(a) -> None:
    x = np.asarray(a.arrays["logits"]).astype(np.float32)
    p, inter = aux_normalised(x, a.params["score_function"])
    idx = topk_by_key(p, a.params["topk"])
    mask = np.zeros(p.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    a.out[0][...] = p
    a.out[1][...] = mask
    a.out[2][...] = inter


def reference_aux_scores_backward(a) -> None:
    g = np.asarray(a.arrays["grad"]).astype(np.float32)
    act = np.asarray(a.arrays["inter"], np.float32)
    sf = a.params["score_function"]
    with np.errstate(over="ignore", invalid="ignore"):
        if sf == "softmax":
            gx = act * (g - (g * act).sum(axis=1, keepdims=True, dtype=np.float32))
        else:
            s = act if sf == "sigmoid" else score(act, "sqrtsoftplus")
            S = s.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20)
            D = (g * s).sum(axis=1, keepdims=True, dtype=np.float32)
            gs = g / S - D / (S * S)
            if sf == "sigmoid":
                gx = gs * s * (np.float32(1) - s)
            else:
                sig = np.float32(1) / (np.float32(1) + np.exp(-act))
                gx = gs * np.where(act > np.float32(20), np.float32(1), sig) / (np.float32(2) * s + np.float32(1e-20))
    a.out[...] = gx.astype(a.out.dtype)


def reference_aux_loss(a) -> None:
    col = np.asarray(a.arrays["probs"]).astype(np.float32).sum(axis=0, dtype=np.float32)
    tpe = np.asarray(a.arrays["tpe"]).astype(np.float32)
    a.out[...] = np.float32((col * tpe).sum(dtype=np.float32) * a.params["c"])


def reference_aux_loss_backward(a) -> None:
    g = np.float32(np.asarray(a.arrays["grad_loss"]).reshape(()))
    row = np.asarray(a.arrays["tpe"]).astype(np.float32) * a.params["c"] * g
    a.out[...] = np.broadcast_to(row, a.out.shape).astype(a.out.dtype)
