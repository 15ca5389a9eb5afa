"""A float64 numpy reference of the MoE block, token by token: routing scores, the chosen
experts' clamped SwiGLU MLPs and the weighted sum written out directly (no permutation), the
shared expert, and the ops' float64 hyper-connection references.  Storage formats the block
defines are rounded the same way (bf16 expert input, intermediate, expert outputs and block
output)."""

from __future__ import annotations

import numpy as np

from ...core.arrays import to_host
from ...ops.hyper_connections import reference_hc_post, reference_hc_pre
from .config import Config
from .moe import MoeWeights
from .reference import _bf, _rms


def _mlp(x, wg, wu, wd, limit):
    """One expert's clamped SwiGLU of rows x (float64, bf16 values): bf16 output."""
    g = x @ wg.T
    u = x @ wu.T
    if limit:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    h = _bf(g / (1.0 + np.exp(-g)) * u)
    return _bf(h @ wd.T)


def _sqrtsoftplus(x):
    return np.sqrt(np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0)))))


def reference_route(cfg: Config, w: MoeWeights, logits, token_ids=None, chosen=None, tie_tol: float = 1e-6):
    """``(weights, indices)`` float64 ``[N, k]`` / int ``[N, k]`` of float64 logits.  ``chosen``
    (the block's indices, host): used instead of the reference's own selection where they differ
    only by near-ties (each chosen expert's selection score within ``tie_tol`` of the k-th best),
    else AssertionError."""
    k = cfg.experts_per_token
    s = _sqrtsoftplus(logits)
    if w.hash:
        idx = np.asarray(w.tid2eid)[np.asarray(token_ids)].astype(np.int64)
    else:
        sel = s + np.asarray(w.bias, np.float64)
        idx = np.argsort(-sel, axis=1, kind="stable")[:, :k]
        if chosen is not None:
            chosen = np.asarray(chosen).astype(np.int64)
            for n in range(len(idx)):
                if set(chosen[n]) != set(idx[n]):
                    kth = sel[n, idx[n]].min()
                    assert sel[n, chosen[n]].min() >= kth - tie_tol * max(1.0, abs(kth)), \
                        f"token {n}: the block chose experts {sorted(chosen[n])}, the reference {sorted(idx[n])}"
                    idx[n] = chosen[n]
    g = np.take_along_axis(s, idx, axis=1)
    wts = g / (g.sum(axis=1, keepdims=True) + 1e-20) if k > 1 else g
    return wts * cfg.route_scale, idx


def reference_moe_block(cfg: Config, w: MoeWeights, X, token_ids=None, chosen=None, tie_tol: float = 1e-6) -> np.ndarray:
    """X_new (float64 ``[N, 4, D]``) of the MoE block; ``chosen``, ``tie_tol`` as in :func:`reference_route`."""
    f = {k: to_host(getattr(w, k)).astype(np.float64) for k in
         ("ffn_norm", "gate", "w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down")}
    X = np.asarray(X, np.float64)
    wh = MoeWeights(**{**vars(w), "bias": to_host(w.bias), "tid2eid": None if w.tid2eid is None else to_host(w.tid2eid)})
    x_in, post, comb = reference_hc_pre(X, to_host(w.hc_fn), to_host(w.hc_scale), to_host(w.hc_base), cfg.norm_eps, cfg.hc_eps,
                                        cfg.sinkhorn_iters)
    xb = _bf(_rms(np.asarray(x_in, np.float64), f["ffn_norm"], cfg.norm_eps))
    logits = xb @ f["gate"].T
    wts, idx = reference_route(cfg, wh, logits, token_ids, chosen, tie_tol)
    R = f["w_gate"].shape[0]
    y = np.zeros_like(xb)
    for n in range(xb.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j]) % R
            y[n] += wts[n, j] * _mlp(xb[n:n + 1], f["w_gate"][e], f["w_up"][e], f["w_down"][e], cfg.swiglu_limit)[0]
    y += _mlp(xb, f["s_gate"][0], f["s_up"][0], f["s_down"][0], cfg.swiglu_limit)
    return reference_hc_post(_bf(y), X, post, comb)


def host_copy(w):
    """A copy of an AttentionWeights / MoeWeights with host (numpy) arrays."""
    from dataclasses import fields, replace
    vals = {}
    for f in fields(w):
        v = getattr(w, f.name)
        vals[f.name] = v if isinstance(v, (str, bool)) else to_host(v)
    return replace(w, **vals)


class ReferenceModel:
    """Float64 reference of a :class:`~.model.Model`'s layers for its B sequences decoded from
    position 0: each layer's attention block from the sequences' history (:class:`ReferenceAttention`)
    and the MoE block token by token.  Weights are copied to the host once.  ``tie_tol``: how far
    (relative) a choice of the block (indexer columns, experts) may fall short of the reference's
    own before it counts as wrong rather than a near-tie: the block's streams after a few layers
    differ from the float64 ones by bf16 rounding, and so do its scores."""

    def __init__(self, model, tie_tol: float = 3e-2):
        self.tie_tol = tie_tol
        from .reference import ReferenceAttention
        self.cfg = model.cfg
        emb = model.embed
        self.embed = to_host(emb).astype(np.float64)
        self.attn = [ReferenceAttention(model.cfg, host_copy(l.attn), model.batch) for l in model.layers]
        self.moe = [host_copy(l.moe) for l in model.layers]

    def step(self, token_ids, trace=None) -> np.ndarray:
        """The streams after the last layer (float64 ``[B, 4, D]``).  ``trace``: the block's
        per-layer trace (:func:`~.model.decode_step`); its indexer columns and routing are used
        where they differ from the reference's only by near-ties."""
        tok = np.asarray(to_host(token_ids)).astype(np.int64)
        X = np.repeat(self.embed[tok][:, None, :], 4, axis=1)
        for i, (ra, mw) in enumerate(zip(self.attn, self.moe)):
            t = trace[i] if trace is not None else {}
            sel = t.get("selected")
            X = ra.step(X, selected=to_host(sel), tie_tol=self.tie_tol)
            ch = to_host(t.get("indices"))
            X = reference_moe_block(self.cfg, mw, X, tok, chosen=ch, tie_tol=self.tie_tol)
        return X
