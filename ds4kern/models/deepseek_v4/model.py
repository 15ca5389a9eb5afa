"""DeepSeek-V4 layers and a decode step of L layers built from ds4kern ops.

A layer is the attention block then the MoE block, both on the 4 hyper-connection streams
``X [N, 4, D]``.  A step starts from the token embeddings (each row copied to the 4 streams, as
the public code does) and returns the streams after the last layer; the head (the final
hyper-connection reduction, norm and vocabulary projection) is not part of it.

Memory: a Flash layer holds 12.9 GB of bf16 routed-expert weights (256 x 3 x 2048 x 4096 x 2
bytes), about 0.35 GB of other weights and its KV state (see :func:`layer_bytes`), so all 43
layers do not fit one GPU; ``layers`` picks the first L and ``resident`` keeps fewer expert
weight sets per layer (expert e runs the weights of e mod resident).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ...core.arrays import BFLOAT16, to_host
from ...core.scope import scope
from .attention import attention_decode, attention_prefill, check_decode
from .config import Config
from .moe import MoeHooks, MoeWeights, expert_bytes, moe_block, random_moe_weights
from .state import LayerState
from .weights import AttentionWeights, random_attention_weights


@dataclass
class Layer:
    attn: AttentionWeights
    moe: MoeWeights
    state: LayerState


@dataclass
class Model:
    """The first ``len(layers)`` layers of a config, their weights and KV states for ``batch``
    sequences, and the embedding table (bf16 ``[vocab, D]``)."""

    cfg: Config
    layers: list
    embed: Any
    xp: Any = np
    hooks: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.layers[0].state.batch

    @classmethod
    def random(cls, cfg: Config, batch: int, *, layers: Optional[int] = None, xp=np, seed: int = 0,
               resident: Optional[int] = None) -> "Model":
        """Seeded random weights of the real shapes for the first ``layers`` layers (default all)."""
        L = cfg.layers if layers is None else int(layers)
        if isinstance(layers, bool) or not 1 <= L <= cfg.layers:
            raise ValueError(f"layers must be in [1, {cfg.layers}], got {layers!r}")
        if isinstance(batch, bool) or int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        out = []
        for i in range(L):
            kind = cfg.kind(i)
            aw = random_attention_weights(cfg, kind, seed=seed * 1000 + i)
            out.append(Layer(aw if xp is np else aw.to(xp),
                             random_moe_weights(cfg, i, seed=seed * 1000 + i, xp=xp, resident=resident),
                             LayerState(cfg, kind, batch, xp=xp)))
        rng = np.random.default_rng((seed, 7))
        emb = np.empty((cfg.vocab, cfg.dim), BFLOAT16)
        for r0 in range(0, cfg.vocab, 8192):
            emb[r0:r0 + 8192] = rng.standard_normal((min(8192, cfg.vocab - r0), cfg.dim), dtype=np.float32)
        return cls(cfg, out, emb if xp is np else xp.asarray(emb), xp)

    def embed_tokens(self, token_ids):
        """Streams ``[N, 4, D]`` float32 of token ids ``[N]`` (each embedding copied to 4 streams)."""
        xp = self.xp
        x = self.embed[token_ids].astype(np.float32)
        return xp.ascontiguousarray(xp.broadcast_to(x[:, None, :], (x.shape[0], 4, x.shape[1])))


def check_tokens(model: Model, token_ids, n: int, name: str = "token_ids"):
    """int32 token ids ``[n]`` on the model's device, checked against the vocabulary (host arrays
    are checked on the host; device arrays cost one synchronisation)."""
    xp = model.xp
    t = token_ids
    if t.shape != (n,) or t.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers of shape [{n}], got {t.dtype} {tuple(t.shape)}")
    if n:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= model.cfg.vocab:
            raise ValueError(f"{name} must lie in [0, vocab={model.cfg.vocab}), got values in [{lo}, {hi}]")
    return xp.asarray(t).astype(np.int32, copy=False)


def _through_layers(model: Model, tok, hooks, trace, name: str, attend):
    """The token rows ``tok`` through every layer: ``attend(layer, X)`` (the attention block,
    decode or prefill), then the MoE block; the hooks' per-step recording after the last layer."""
    X = model.embed_tokens(tok)
    with scope(name):
        for i, layer in enumerate(model.layers):
            with scope(f"layer{i}"):
                X = attend(layer, X)
                t = None if trace is None else {"selected": layer.state.last_selected}
                X = moe_block(model.cfg, layer.moe, X, tok, layer=i, hooks=hooks, trace=t)
                if trace is not None:
                    trace.append(t)
        if hooks is not None:
            hooks.finish_step(len(model.layers), int(X.shape[0]))
    return X


def _layers(model: Model, tok, pos_host, pos_d, hooks, trace, slot_horizon: int = 0):
    def attend(layer, X):
        return attention_decode(model.cfg, layer.attn, layer.state, X, pos_host, positions_device=pos_d,
                                slot_horizon=slot_horizon)

    return _through_layers(model, tok, hooks, trace, "step", attend)


def decode_step(model: Model, token_ids, positions, *, hooks: Optional[MoeHooks] = None,
                trace: Optional[list] = None):
    """One decode step of every layer of the model for its B sequences (one token each at its own
    position); returns the streams ``[B, 4, D]`` after the last layer and advances every layer's
    state.  ``hooks``: routing capture / locality recorder inside the MoE blocks; ``trace`` (a
    list) gets one dict per layer: the indexer's columns (``"selected"``) and the routing.
    :class:`StepGraph` replays the same step from a CUDA graph."""
    tok = check_tokens(model, token_ids, model.batch)
    pos_host = np.asarray(to_host(positions))
    return _layers(model, tok, pos_host, None, hooks, trace)


class StepGraph:
    """A decode step of the whole model captured once into a CUDA graph and replayed per step
    (one launch for every kernel of every layer).  Token ids and positions are checked on the
    host, copied into the graph's static device buffers, then the graph runs.

    ``horizon``: steps the graph stays valid for (HCA layers index the compressed rows that become
    visible within it); :meth:`step` refuses a step beyond it.  Capture runs one eager step
    first (compiles kernels, fills the memory pool) and puts the states back as they were
    (``restore=False``: leaves that step's writes in the states, for timing only).  The
    graph's intermediate buffers come from CuPy's pool; keep other GPU work off the stream while
    it replays."""

    def __init__(self, model: Model, horizon: int = 256, hooks: Optional[MoeHooks] = None, restore: bool = True):
        import cupy as cp
        if model.xp is np:
            raise ValueError("StepGraph needs a model on the GPU (Model.random(..., xp=cupy))")
        if hooks is not None and hooks.recorder is not None:
            raise ValueError("StepGraph cannot replay the locality recorder: its record counts and clocks "
                             "are host values a graph would freeze; capture the routing only (MoeHooks("
                             "capture=...)) and record eagerly, or use decode_step")
        self.model, self.cp, self.hooks = model, cp, hooks
        self.horizon = int(horizon)
        B = model.batch
        self.tok = cp.zeros(B, np.int32)
        self.pos = cp.zeros(B, np.int64)
        self.start = model.layers[0].state.next_pos.copy()
        self.stream = cp.cuda.Stream(non_blocking=True)
        snaps = [l.state.snapshot() if restore else None for l in model.layers]
        tok0 = np.zeros(B, np.int32)
        with self.stream:
            self.pos.set(self.start)
            self.tok.set(tok0)
            _layers(model, self.tok, self.start, self.pos, hooks, None, self.horizon)  # warm-up
            self.stream.synchronize()
            for l, sn in zip(model.layers, snaps):
                if sn is not None:
                    l.state.restore(sn)
            if not restore:
                self.start = model.layers[0].state.next_pos.copy()
                self.pos.set(self.start)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self.out = _layers(model, self.tok, self.start, self.pos, hooks, None, self.horizon)
            finally:
                self.graph = self.stream.end_capture()
        for l in model.layers:
            l.state.next_pos = self.start.copy()
            l.state.last_selected = None

    def step(self, token_ids, positions):
        """Replay one step (host ``token_ids`` / ``positions`` ``[B]``); returns the streams
        ``[B, 4, D]`` (the graph's output buffer: copy it to keep it past the next step)."""
        m = self.model
        tok = np.asarray(token_ids)
        pos = np.asarray(positions).astype(np.int64)
        check_tokens(m, tok, m.batch)
        if (pos > self.start + self.horizon - 1).any():
            raise ValueError(f"positions beyond the graph's horizon (captured at {self.start.min()}, "
                             f"horizon {self.horizon}): capture a new StepGraph")
        for l in m.layers:
            check_decode(m.cfg, l.attn, l.state, self.out, pos)
        with self.stream:
            self.tok.set(tok.astype(np.int32))
            self.pos.set(pos)
            self.graph.launch(self.stream)
        self.stream.synchronize()
        for l in m.layers:
            l.state.next_pos = pos + 1
        return self.out


def prefill(model: Model, token_ids, seq: int = 0, *, hooks: Optional[MoeHooks] = None,
            trace: Optional[list] = None):
    """A chunk of T tokens of sequence ``seq`` through every layer (continuing its state);
    returns the streams ``[T, 4, D]``; ``trace`` as in :func:`decode_step`."""
    t = token_ids
    tok = check_tokens(model, t, int(t.shape[0]) if t.ndim == 1 and t.shape[0] else -1)
    return _through_layers(model, tok, hooks, trace, "prefill",
                           lambda layer, X: attention_prefill(model.cfg, layer.attn, layer.state, X, seq))


def layer_bytes(cfg: Config, layer: int, batch: int, resident: Optional[int] = None) -> dict:
    """Device bytes of one layer: routed-expert weights, other weights (attention float32, router,
    shared expert, hash table) and the KV state for ``batch`` sequences at ``cfg.max_context``."""
    from .config import HEAD_DIM, INDEX_DIM
    R = cfg.experts if resident is None else int(resident)
    D, H, I = cfg.dim, cfg.heads, cfg.moe_inter
    r = cfg.ratios[layer]
    ql, G, OR = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    # projection matrices bf16 (2 bytes), vectors float32 (4 bytes)
    attn = 2 * (ql * D + H * HEAD_DIM * ql + HEAD_DIM * D + G * OR * cfg.group_width + D * G * OR)
    attn += 4 * (24 * 4 * D + 3 + 24 + D + ql + HEAD_DIM + H)
    if r:
        coff = 2 if r == 4 else 1
        attn += 2 * (2 * coff * HEAD_DIM * D) + 4 * (r * coff * HEAD_DIM + HEAD_DIM)
    if r == 4:
        attn += 2 * (64 * INDEX_DIM * ql + 64 * D + 4 * INDEX_DIM * D) + 4 * (4 * 2 * INDEX_DIM + INDEX_DIM)
    other = attn + 4 * (24 * 4 * D + 3 + 24 + D + cfg.experts) + 2 * (cfg.experts * D + 3 * I * D)
    if cfg.is_hash(layer):
        other += cfg.vocab * cfg.experts_per_token * 4
    rows = cfg.rows(r)
    state = batch * (rows + cfg.window) * HEAD_DIM * 2
    if r:
        from ...ops.compressor.api import state_shape
        state += 2 * 4 * int(np.prod(state_shape(batch, r, HEAD_DIM)))  # kv and score, float32
    if r == 4:
        state += batch * rows * INDEX_DIM * 2 + 2 * 4 * int(np.prod(state_shape(batch, 4, INDEX_DIM)))
    return {"experts": R * expert_bytes(cfg), "other_weights": other, "state": state}
