"""DeepSeek-V4's attention block: decode (B sequences, one token each at its own position) and
prefill (a chunk of T tokens of one sequence, continuing its state).

    X --hc_pre--> x_in -> RMSNorm -> q path (wq_a, q_norm, wq_b, per-head RMS, RoPE on dims
    448:512) and the KV row (wkv, kv_norm, RoPE) -> window ring -> compressor (CSA / HCA) ->
    indexer (CSA) -> slot indices -> sparse_attention (sink, inverse RoPE) -> grouped output
    projection (wo_a per group, wo_b) -> hc_post -> X_new

Every op but the dense projections is a ds4kern op (numpy arrays: the reference backend; CuPy:
the GPU variants); projections are float32 matmuls of the array library (cuBLAS on the GPU).
RoPE tables: theta 10000 without YaRN on SWA layers, ``compress_rope_theta`` with YaRN on CSA /
HCA layers, one table per layer for q, the KV rows, the compressors, the indexer and the
inverse RoPE (notes section 2).

Deviations from the public inference code (bench/lab/deepseek_v4_attention_notes.md):
- the KV rows stay bf16 (no FP8 round trip of the nope dims); the indexer keys stay bf16 (no
  Hadamard transform, no FP4 round trip: the transform cancels without quantisation);
- the compressors' projections are rounded to bf16 before pooling (the reference pools float32);
- the hyper-connection streams may be float32 (the reference keeps bf16).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ...core.arrays import BFLOAT16, to_host
from ...core.scope import scope
from ...ops.compressor import compress_decode, compress_prefill
from ...ops.expert_mlp import grouped_linear, grouped_rows
from ...ops.hyper_connections import hc_post, hc_pre
from ...ops.norm import rms_norm, rope_rotate
from ...ops.indexer import indexer_topk
from ...ops.sparse_attention import decode_slots, sparse_attention
from ...rope import rope_table
from .config import HEAD_DIM, INDEX_DIM, INDEX_HEADS, ROPE_DIM, Config
from .state import LayerState
from .weights import AttentionWeights


@lru_cache(maxsize=8)
def _host_tables(max_pos: int, theta: float, yarn: bool, factor: float, original: int):
    return rope_table(max_pos, ROPE_DIM, theta, yarn_factor=factor if yarn else None, original_max_pos=original)


def rope_tables(cfg: Config, ratio: int, xp=np):
    """``(cos, sin)`` float32 ``[max_context, 32]`` of a layer kind, as arrays of ``xp``."""
    if ratio == 0:
        c, s = _host_tables(cfg.max_context, cfg.rope_theta, False, cfg.yarn_factor, cfg.yarn_original)
    else:
        c, s = _host_tables(cfg.max_context, cfg.compress_rope_theta, True, cfg.yarn_factor, cfg.yarn_original)
    return (c, s) if xp is np else (xp.asarray(c), xp.asarray(s))


def linear(xp, x, w, out_dtype=np.float32):
    """``x @ w.T`` of rows ``x`` ``[n, in]`` (rounded to bf16, as the public code's activations are)
    and bf16 ``w`` ``[out, in]``: ``grouped_linear`` with one group, float32 accumulation, so the
    whole step stays capturable in a CUDA graph (CuPy refuses cuBLAS calls during a capture)."""
    xb = xp.ascontiguousarray(x if x.dtype == BFLOAT16 else x.astype(BFLOAT16))
    return grouped_linear(xb, grouped_rows(xp, xb.shape[0], 1), w[None], out_dtype=out_dtype)


def window_slots(xp, positions, ring_base: int, window: int = 128):
    """int32 ``[B, window]``: pool slots of each sequence's window rows, positions p - 127 .. p
    (oldest first), -1 for positions before 0 (``decode_slots`` without compressed rows)."""
    return decode_slots(positions, window=window, ring_base=ring_base, rows=0)


def state_rope(st: LayerState):
    """The layer's ``(cos, sin)`` tables as arrays of the state's library, made once per state
    (on the GPU: one host-to-device copy, not one per step)."""
    if st.rope is None:
        st.rope = rope_tables(st.cfg, st.ratio, st.xp)
    return st.rope


def _project(xp, cfg: Config, w: AttentionWeights, x, cos, sin, pos):
    """The q path and the KV row of n tokens at positions ``pos``: ``(qr bf16, q bf16 [n, H, 512],
    kv bf16 [n, 512])``."""
    n = x.shape[0]
    with scope("q"):
        qr = rms_norm(linear(xp, x, w.wq_a), w.q_norm, eps=cfg.norm_eps, out_dtype=BFLOAT16)
        q = rms_norm(linear(xp, qr, w.wq_b).reshape(n, cfg.heads, HEAD_DIM), None, eps=cfg.norm_eps)
        q = rope_rotate(q, cos, sin, pos).astype(BFLOAT16)
    with scope("kv"):
        kv = rms_norm(linear(xp, x, w.wkv), w.kv_norm, eps=cfg.norm_eps)
        kv = rope_rotate(kv, cos, sin, pos).astype(BFLOAT16)
    return qr, q, kv


def _index_query(xp, w: AttentionWeights, qr, x, cos, sin, pos):
    """The indexer's queries (bf16 ``[n, 64, 128]``, RoPE on dims 64:128) and head weights (float32
    ``[n, 64]``, the 1/sqrt(64 * 128) scale folded in)."""
    iq = linear(xp, qr, w.i_wq_b).reshape(x.shape[0], INDEX_HEADS, INDEX_DIM)
    iq = rope_rotate(iq, cos, sin, pos)
    iw = linear(xp, x, w.i_wproj) * np.float32((INDEX_DIM * INDEX_HEADS) ** -0.5)
    return iq.astype(BFLOAT16), iw.astype(np.float32)


def _compressor_inputs(xp, x, wkv, wgate):
    """A compressor's two projections of n tokens, bf16 (``(kv, score)``)."""
    return linear(xp, x, wkv, BFLOAT16), linear(xp, x, wgate, BFLOAT16)


def _output(xp, cfg: Config, w: AttentionWeights, o):
    """Grouped output projection of the attention output ``o`` ``[n, H, 512]``: bf16 ``[n, D]``."""
    n, G, R = o.shape[0], cfg.o_groups, cfg.o_lora_rank
    with scope("output"):
        og = xp.ascontiguousarray(o.reshape(n, G, cfg.group_width).transpose(1, 0, 2)).reshape(G * n, cfg.group_width)
        z = grouped_linear(og, grouped_rows(xp, n, G), w.wo_a, out_dtype=BFLOAT16)     # [G n, R], group-major
        z = z.reshape(G, n, R).transpose(1, 0, 2).reshape(n, G * R)
        return linear(xp, z, w.wo_b, BFLOAT16)


def check_decode(cfg: Config, w: AttentionWeights, st: LayerState, X, positions) -> np.ndarray:
    """Validates one decode call before anything is changed; returns the positions (host int64)."""
    if w.kind != st.kind:
        raise ValueError(f"weights are for a {w.kind!r} layer, the state for a {st.kind!r} layer")
    if tuple(X.shape) != (st.batch, 4, cfg.dim):
        raise ValueError(f"X must have shape [B, 4, D] = {(st.batch, 4, cfg.dim)}, got {tuple(X.shape)}")
    pos = np.asarray(to_host(positions))
    if pos.shape != (st.batch,) or pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers of shape [B] = ({st.batch},), got {pos.dtype} {pos.shape}")
    pos = pos.astype(np.int64)
    if (pos >= cfg.max_context).any():
        b = int(np.flatnonzero(pos >= cfg.max_context)[0])
        raise ValueError(f"positions[{b}] = {int(pos[b])} is beyond the configured max_context {cfg.max_context}")
    if (pos != st.next_pos).any():
        b = int(np.flatnonzero(pos != st.next_pos)[0])
        raise ValueError(f"positions[{b}] = {int(pos[b])}, but sequence {b}'s cache holds positions "
                         f"0 .. {int(st.next_pos[b]) - 1}: decode its tokens in order (next: {int(st.next_pos[b])})")
    return pos


def attention_decode(cfg: Config, w: AttentionWeights, st: LayerState, X, positions, *, positions_device=None,
                     slot_horizon: int = 0):
    """One decode step of the attention block; returns ``X_new`` ``[B, 4, D]`` (X's dtype) and
    advances the state (KV ring row, compressor rows and states, indexer keys, next positions;
    ``st.last_selected``: the indexer's columns ``[B, index_topk]`` on CSA layers, else None).
    A call refused by validation changes nothing.

    For CUDA-graph capture (no host synchronisation, no host-to-device copy): ``positions`` on
    the host and the same values already on the device in ``positions_device`` (int64 ``[B]``);
    ``slot_horizon``: HCA layers index the rows visible ``slot_horizon`` tokens later too (-1
    until then), so a graph captured now stays right for that many replays."""
    pos_host = check_decode(cfg, w, st, X, positions)
    xp = st.xp
    B, r = st.batch, st.ratio
    pos = xp.asarray(pos_host) if positions_device is None else positions_device
    cos, sin = state_rope(st)
    with scope("attention"):
        x_in, post, comb = hc_pre(X, w.hc_fn, w.hc_scale, w.hc_base, norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps,
                                  sinkhorn_iters=cfg.sinkhorn_iters)
        x = rms_norm(x_in, w.attn_norm, eps=cfg.norm_eps, out_dtype=BFLOAT16)  # projections read bf16 rows
        qr, q, kv = _project(xp, cfg, w, x, cos, sin, pos)
        st.ring[xp.arange(B), pos % cfg.window] = kv
        selected = None
        if r == 4:
            with scope("indexer"):
                iq, iw = _index_query(xp, w, qr, x, cos, sin, pos)
                compress_decode(*_compressor_inputs(xp, x, w.i_wkv, w.i_wgate), w.i_ape, w.i_norm, pos, cos, sin,
                                st.index_comp[0], st.index_comp[1], st.index_keys, ratio=4, eps=cfg.norm_eps)
                lengths = ((pos + 1) // 4).astype(np.int32)
                selected = indexer_topk(iq, iw, st.index_keys, cfg.index_topk, lengths=lengths)
        if r:
            with scope("compressor"):
                compress_decode(*_compressor_inputs(xp, x, w.c_wkv, w.c_wgate), w.c_ape, w.c_norm, pos, cos, sin,
                                st.comp[0], st.comp[1], st.cache, ratio=r, eps=cfg.norm_eps)
        width = max(1, int(pos_host.max() + 1 + int(slot_horizon)) // r) if r and selected is None else 0
        idx = decode_slots(pos, window=cfg.window, ring_base=st.ring_base, rows=st.rows, ratio=r, selected=selected,
                           width=width)
        o = sparse_attention(q, st.pool, idx, w.sink, scale=HEAD_DIM ** -0.5, positions=pos, rope=(cos, sin))
        X_new = hc_post(_output(xp, cfg, w, o), X, post, comb)
    st.next_pos = pos_host + 1
    st.last_selected = selected
    return X_new


def attention_prefill(cfg: Config, w: AttentionWeights, st: LayerState, X, seq: int = 0):
    """A chunk of T tokens of sequence ``seq`` at positions ``next_pos[seq] ..`` through the block
    at once (``X`` ``[T, 4, D]``); returns ``X_new`` ``[T, 4, D]`` and advances that sequence's
    state exactly as T decode steps would (same rows, same compressor states, within float
    rounding of the projections).  Causality lives in the indices: token t sees window positions
    ``t - 127 .. t`` and compressed rows ``c < (t + 1) // ratio``.  The attention reads a temporary
    pool: this sequence's compressed rows and window ring as they were, then the chunk's T rows."""
    if w.kind != st.kind:
        raise ValueError(f"weights are for a {w.kind!r} layer, the state for a {st.kind!r} layer")
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < st.batch:
        raise ValueError(f"seq must be a sequence of the state, 0 <= seq < {st.batch}, got {seq!r}")
    T = int(X.shape[0]) if X.ndim == 3 else -1
    if X.ndim != 3 or tuple(X.shape[1:]) != (4, cfg.dim) or T < 1:
        raise ValueError(f"X must have shape [T >= 1, 4, D={cfg.dim}], got {tuple(X.shape)}")
    p0 = int(st.next_pos[seq])
    if p0 + T > cfg.max_context:
        raise ValueError(f"positions {p0} .. {p0 + T - 1} go beyond the configured max_context {cfg.max_context}")
    xp = st.xp
    r, W, rows = st.ratio, cfg.window, st.rows
    pos = xp.arange(p0, p0 + T, dtype=np.int64)
    cos, sin = state_rope(st)
    b = int(seq)
    with scope("attention_prefill"):
        x_in, post, comb = hc_pre(X, w.hc_fn, w.hc_scale, w.hc_base, norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps,
                                  sinkhorn_iters=cfg.sinkhorn_iters)
        x = rms_norm(x_in, w.attn_norm, eps=cfg.norm_eps, out_dtype=BFLOAT16)  # projections read bf16 rows
        qr, q, kv = _project(xp, cfg, w, x, cos, sin, pos)
        lengths = ((pos + 1) // max(r, 1)).astype(np.int32)
        selected = None
        if r == 4:
            with scope("indexer"):
                iq, iw = _index_query(xp, w, qr, x, cos, sin, pos)
                ikv, iscore = _compressor_inputs(xp, x, w.i_wkv, w.i_wgate)
                compress_prefill(ikv[None], iscore[None], w.i_ape, w.i_norm, p0, cos, sin, st.index_comp[0][b:b + 1],
                                 st.index_comp[1][b:b + 1], st.index_keys[b:b + 1], ratio=4, eps=cfg.norm_eps)
                selected = indexer_topk(iq, iw, st.index_keys[b:b + 1], cfg.index_topk, lengths=lengths)
        if r:
            with scope("compressor"):
                ckv, cscore = _compressor_inputs(xp, x, w.c_wkv, w.c_wgate)
                compress_prefill(ckv[None], cscore[None], w.c_ape, w.c_norm, p0, cos, sin, st.comp[0][b:b + 1],
                                 st.comp[1][b:b + 1], st.cache[b:b + 1], ratio=r, eps=cfg.norm_eps)
        # temporary pool: [this sequence's compressed rows | its ring as before the chunk | the chunk's rows]
        pool = xp.concatenate([st.cache[b], st.ring[b], kv], axis=0)
        q_pos = pos.reshape(T, 1) - (W - 1) + xp.arange(W).reshape(1, W)           # window positions
        slot = xp.where(q_pos >= p0, rows + W + (q_pos - p0), rows + q_pos % W)
        idx = xp.where(q_pos >= 0, slot, -1).astype(np.int32)
        if r == 4:
            idx = xp.concatenate([idx, selected], axis=1)  # compressed row c sits at slot c
        elif r:
            width = max(1, int((p0 + T) // r))
            c = xp.arange(width).reshape(1, width)
            idx = xp.concatenate([idx, xp.where(c < lengths.reshape(T, 1), c, -1).astype(np.int32)], axis=1)
        o = sparse_attention(q, pool, xp.ascontiguousarray(idx), w.sink, scale=HEAD_DIM ** -0.5, positions=pos,
                             rope=(cos, sin))
        X_new = hc_post(_output(xp, cfg, w, o), X, post, comb)
        last = slice(max(0, T - W), T)
        st.ring[b, pos[last] % W] = kv[last]
    st.next_pos = st.next_pos.copy()
    st.next_pos[b] = p0 + T
    st.last_selected = selected
    return X_new
