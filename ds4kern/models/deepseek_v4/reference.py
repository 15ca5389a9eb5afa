"""A float64 numpy reference of the attention block (decode), written from the sequence's history
rather than from the block's state: per sequence, every past KV row and every compressor input is
kept, the window is the last 128 rows, compressed rows are pooled from the inputs of their
tokens, and attention is a plain softmax over the rows with the sink.  Storage formats the block
defines are rounded the same way (bf16 normed rows and q_lora rows read by the projections, KV
rows, q, attention output, the grouped projection's output, y, indexer inputs).  hc_pre
and hc_post come from the ops' float64 references."""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16
from ...ops.hyper_connections import reference_hc_post, reference_hc_pre
from ...ops.topk import reference_topk_rows
from .attention import rope_tables
from .config import HEAD_DIM, INDEX_DIM, INDEX_HEADS, ROPE_DIM, Config
from .weights import AttentionWeights


def _bf(x):
    return np.asarray(x, np.float64).astype(np.float32).astype(BFLOAT16).astype(np.float64)


def _rms(x, w, eps):
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y if w is None else y * np.asarray(w, np.float64)


def _rope(x, c, s, inverse=False):
    """x [..., 64] float64, c / s [32]."""
    s = -s if inverse else s
    out = x.copy()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def _pool_row(kv, sc, ape, ratio, c, d):
    """Compressed row c from the token inputs kv / sc ([positions, coff * d], float64)."""
    if ratio == 4:
        prev = range(4 * (c - 1), 4 * c)
        cur = range(4 * c, 4 * c + 4)
        K = [kv[t, :d] if t >= 0 else np.zeros(d) for t in prev] + [kv[t, d:] for t in cur]
        S = [sc[t, :d] + ape[t % 4, :d] if t >= 0 else np.full(d, -np.inf) for t in prev]
        S += [sc[t, d:] + ape[t % 4, d:] for t in cur]
    else:
        toks = range(ratio * c, ratio * c + ratio)
        K = [kv[t] for t in toks]
        S = [sc[t] + ape[t % ratio] for t in toks]
    K, S = np.array(K), np.array(S, np.float64)
    S = S.astype(np.float32).astype(np.float64)  # the state holds float32 scores
    e = np.exp(S - S.max(axis=0))
    return (e * K).sum(axis=0) / e.sum(axis=0)


class ReferenceAttention:
    """Runs the block for B sequences from position 0, one decode step at a time."""

    def __init__(self, cfg: Config, w: AttentionWeights, batch: int):
        self.cfg, self.w, self.B = cfg, w, batch
        self.r = w.ratio
        self.cos, self.sin = (t.astype(np.float64) for t in rope_tables(cfg, self.r))
        self.rows = [[] for _ in range(batch)]        # KV rows (bf16 values) by position
        self.comp_in = [[] for _ in range(batch)]     # (kv, score) compressor inputs by position
        self.idx_in = [[] for _ in range(batch)]      # (kv, score) indexer-compressor inputs
        self.comp_rows = [[] for _ in range(batch)]   # compressed rows, by row number
        self.idx_keys = [[] for _ in range(batch)]
        self.selected = None                          # CSA: the last step's indexer columns [B, k]
        self.ties = 0

    def _near_tie(self, got, want, score, tol):
        valid = want[want >= 0]
        assert (got >= 0).sum() == valid.size, f"indexer chose {(got >= 0).sum()} columns, the reference {valid.size}"
        kth = score[valid].min()
        short = (kth - score[got[got >= 0]].min()) / max(np.abs(score).max(), 1e-30)
        assert short <= tol, f"the indexer's choice is not a top-k up to near-ties (short by {short:.2e} of max |score|)"
        self.ties += 1
        return got

    def _compressed(self, b, inputs, rows, ratio, ape, norm, d):
        p = len(inputs) - 1
        if (p + 1) % ratio == 0:
            kv = np.array([i[0] for i in inputs])
            sc = np.array([i[1] for i in inputs])
            c = p // ratio
            row = _rms(_bf(_pool_row(kv, sc, np.asarray(ape, np.float64), ratio, c, d)), norm, self.cfg.norm_eps)
            row[d - ROPE_DIM:] = _rope(row[d - ROPE_DIM:], self.cos[c * ratio], self.sin[c * ratio])
            rows.append(_bf(row))

    def step(self, X, selected=None, tie_tol: float = 1e-2) -> np.ndarray:
        """X_new of one step.  ``selected`` (CSA, host ``[B, k]``): the block's indexer columns; they
        are used instead of the reference's own choice when they differ from it only by near-ties
        (each chosen column's score within ``tie_tol`` x the row's largest |score| of the k-th
        best), else AssertionError.  ``self.ties`` counts the steps where the choices differed."""
        cfg, w, B, H, r = self.cfg, self.w, self.B, self.cfg.heads, self.r
        f = {k: np.asarray(v, np.float64) for k, v in vars(w).items() if k != "kind" and v is not None}
        x_in, post, comb = reference_hc_pre(X, w.hc_fn, w.hc_scale, w.hc_base, cfg.norm_eps, cfg.hc_eps,
                                            cfg.sinkhorn_iters)
        x = _bf(_rms(np.asarray(x_in, np.float64), f["attn_norm"], cfg.norm_eps))  # projections read bf16 rows
        ys = np.zeros((B, cfg.dim))
        sel_out = []
        for b in range(B):
            p = len(self.rows[b])
            c, s = self.cos[p], self.sin[p]
            qr = _bf(_rms(f["wq_a"] @ x[b], f["q_norm"], cfg.norm_eps))
            q = _rms((f["wq_b"] @ qr).reshape(H, HEAD_DIM), None, cfg.norm_eps)
            q[:, HEAD_DIM - ROPE_DIM:] = _rope(q[:, HEAD_DIM - ROPE_DIM:], c, s)
            q = _bf(q)
            kv = _rms(f["wkv"] @ x[b], f["kv_norm"], cfg.norm_eps)
            kv[HEAD_DIM - ROPE_DIM:] = _rope(kv[HEAD_DIM - ROPE_DIM:], c, s)
            self.rows[b].append(_bf(kv))
            extra = []
            if r == 4:
                iq = (f["i_wq_b"] @ qr).reshape(INDEX_HEADS, INDEX_DIM)
                iq[:, INDEX_DIM - ROPE_DIM:] = _rope(iq[:, INDEX_DIM - ROPE_DIM:], c, s)
                iq = _bf(iq)
                iw = (f["i_wproj"] @ x[b]) * (INDEX_DIM * INDEX_HEADS) ** -0.5
                iw = iw.astype(np.float32).astype(np.float64)
                self.idx_in[b].append((_bf(f["i_wkv"] @ x[b]), _bf(f["i_wgate"] @ x[b])))
                self._compressed(b, self.idx_in[b], self.idx_keys[b], 4, f["i_ape"], f["i_norm"], INDEX_DIM)
                n = (p + 1) // 4
                keys = np.array(self.idx_keys[b][:n]).reshape(n, INDEX_DIM)
                score = (np.maximum(iq @ keys.T, 0.0) * iw[:, None]).sum(axis=0) if n else np.zeros(0)
                sel = reference_topk_rows(score.astype(np.float32)[None, :], cfg.index_topk)[0] if n else \
                    np.full(cfg.index_topk, -1, np.int32)
                if selected is not None and not np.array_equal(np.sort(selected[b]), np.sort(sel)):
                    sel = self._near_tie(np.asarray(selected[b]), sel, score, tie_tol)
                sel_out.append(sel)
            if r:
                self.comp_in[b].append((_bf(f["c_wkv"] @ x[b]), _bf(f["c_wgate"] @ x[b])))
                self._compressed(b, self.comp_in[b], self.comp_rows[b], r, f["c_ape"], f["c_norm"], HEAD_DIM)
                if r == 4:
                    extra = [self.comp_rows[b][j] for j in sel_out[-1] if j >= 0]
                else:
                    extra = self.comp_rows[b][:(p + 1) // r]
            rows = np.array(self.rows[b][max(0, p - cfg.window + 1):] + list(extra))
            sc = (q @ rows.T) * HEAD_DIM ** -0.5                       # [H, n]
            m = sc.max(axis=1, keepdims=True)
            e = np.exp(sc - m)
            o = (e @ rows) / (e.sum(axis=1, keepdims=True) + np.exp(f["sink"][:, None] - m))
            o[:, HEAD_DIM - ROPE_DIM:] = _rope(o[:, HEAD_DIM - ROPE_DIM:], c, s, inverse=True)
            o = _bf(o).reshape(cfg.o_groups, cfg.group_width)
            z = _bf(np.einsum("gri,gi->gr", f["wo_a"], o).reshape(-1))
            ys[b] = _bf(f["wo_b"] @ z)
        self.selected = np.array(sel_out) if sel_out else None
        return reference_hc_post(ys, X, post, comb)


def reference_attention_decode(cfg: Config, w: AttentionWeights, X_steps) -> list:
    """X_new of every step for B sequences decoded from position 0 (``X_steps``: the streams
    entering the block at each step, host arrays ``[B, 4, D]``)."""
    ref = ReferenceAttention(cfg, w, X_steps[0].shape[0])
    return [ref.step(X) for X in X_steps]
