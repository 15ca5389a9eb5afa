"""Per-layer KV state of a batch of B sequences: one pool of bf16 rows holding every sequence's
compressed rows and its 128-row window ring, the compressors' states, the indexer's keys, and
each sequence's next position."""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16
from ...ops.compressor import init_state
from .config import HEAD_DIM, INDEX_DIM, KINDS, Config


def _zeros_bf16(xp, shape):
    """bf16 zeros made in place (no float32 temporary of the whole size: a 1M-token pool is tens of GB)."""
    a = xp.empty(shape, BFLOAT16)
    a.view(np.uint16)[...] = 0
    return a


class LayerState:
    """Pool layout (``pool`` bf16 ``[B * rows + B * 128, 512]``): sequence b's compressed row c at
    slot ``b * rows + c`` (``cache`` = the first ``B * rows`` rows as ``[B, rows, 512]``), its window
    ring row ``p % 128`` at slot ``B * rows + b * 128 + p % 128`` (``ring`` ``[B, 128, 512]``).
    ``next_pos[b]``: the position sequence b's next token must have (host int64)."""

    def __init__(self, cfg: Config, kind: str, batch: int, xp=np):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.cfg, self.kind, self.batch, self.xp = cfg, kind, int(batch), xp
        r = KINDS[kind]
        self.ratio = r
        self.rows = cfg.rows(r)
        B, W = self.batch, cfg.window
        self.pool = _zeros_bf16(xp, (B * self.rows + B * W, HEAD_DIM))
        self.cache = self.pool[:B * self.rows].reshape(B, self.rows, HEAD_DIM)
        self.ring = self.pool[B * self.rows:].reshape(B, W, HEAD_DIM)
        self.comp = init_state(B, r, HEAD_DIM, xp=xp) if r else None
        if r == 4:
            self.index_keys = _zeros_bf16(xp, (B, self.rows, INDEX_DIM))
            self.index_comp = init_state(B, 4, INDEX_DIM, xp=xp)
        else:
            self.index_keys = self.index_comp = None
        self.next_pos = np.zeros(B, np.int64)
        self.last_selected = None
        self.rope = None  # (cos, sin) of this layer kind, made at first use (attention.state_rope)

    def fill_random(self, positions, seed: int = 0) -> "LayerState":
        """State as if sequence b had decoded positions ``0 .. positions[b] - 1``, with random
        contents of the right shapes and magnitudes (KV rows of unit RMS, finite compressor
        state): for timing decode at a context length without decoding up to it."""
        xp, cfg, B = self.xp, self.cfg, self.batch
        pos = np.asarray(positions, np.int64).reshape(-1)
        if pos.shape != (B,) or (pos < 0).any() or (pos >= cfg.max_context).any():
            raise ValueError(f"positions must be {B} integers in [0, max_context={cfg.max_context})")
        rs = np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)

        def rand(shape, dtype=np.float32):
            return rs.standard_normal(shape, dtype=np.float32).astype(dtype)

        # the pool in slices of at most 2^20 rows (a 2 GB float32 temporary): a 1M-token CSA pool of 256
        # sequences is 68 GB, made on the device (CuPy's generator) without a float32 copy of the whole
        step = 1 << 20
        for r0 in range(0, self.pool.shape[0], step):
            n = min(step, self.pool.shape[0] - r0)
            self.pool[r0:r0 + n] = rand((n, HEAD_DIM), BFLOAT16)
        if self.comp is not None:
            self.comp[0][...] = rand(self.comp[0].shape)
            self.comp[1][...] = rand(self.comp[1].shape)
        if self.index_keys is not None:
            for b in range(B):
                self.index_keys[b] = rand(self.index_keys.shape[1:], BFLOAT16)
            self.index_comp[0][...] = rand(self.index_comp[0].shape)
            self.index_comp[1][...] = rand(self.index_comp[1].shape)
        self.next_pos = pos.copy()
        return self

    @property
    def ring_base(self) -> int:
        return self.batch * self.rows

    def restore(self, snap: dict) -> "LayerState":
        """Put back a :meth:`snapshot` (host arrays) taken of this state."""
        xp = self.xp
        self.pool[...] = xp.asarray(snap["pool"])
        self.next_pos = snap["next_pos"].copy()
        if self.comp is not None:
            self.comp[0][...] = xp.asarray(snap["comp_kv"])
            self.comp[1][...] = xp.asarray(snap["comp_score"])
        if self.index_keys is not None:
            self.index_keys[...] = xp.asarray(snap["index_keys"])
            self.index_comp[0][...] = xp.asarray(snap["index_kv"])
            self.index_comp[1][...] = xp.asarray(snap["index_score"])
        self.last_selected = None
        return self

    def snapshot(self) -> dict:
        """Host copies of every array of the state (tests: a refused call changes nothing)."""
        xp = self.xp
        get = (lambda a: a.get()) if xp is not np else (lambda a: a.copy())
        out = {"pool": get(self.pool), "next_pos": self.next_pos.copy()}
        if self.comp is not None:
            out["comp_kv"], out["comp_score"] = get(self.comp[0]), get(self.comp[1])
        if self.index_keys is not None:
            out["index_keys"] = get(self.index_keys)
            out["index_kv"], out["index_score"] = get(self.index_comp[0]), get(self.index_comp[1])
        return out
