"""Random attention weights of DeepSeek-V4's real shapes (seeded): projection matrices bf16 (the
checkpoint's are FP8 / bf16; ``grouped_linear`` runs them on tensor cores), norms, sink,
hyper-connection and position-bias vectors float32."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np

from ...core.arrays import BFLOAT16
from .config import HEAD_DIM, INDEX_DIM, INDEX_HEADS, KINDS, Config


@dataclass
class AttentionWeights:
    """One layer's attention-block weights ([out, in] like the checkpoint).  Compressor fields are
    None on SWA layers, indexer fields None except on CSA layers."""

    kind: str
    hc_fn: Any        # [24, 4D]
    hc_scale: Any     # [3]
    hc_base: Any      # [24]
    attn_norm: Any    # [D]
    wq_a: Any         # [q_lora, D]
    q_norm: Any       # [q_lora]
    wq_b: Any         # [H * 512, q_lora]
    wkv: Any          # [512, D]
    kv_norm: Any      # [512]
    sink: Any         # [H]
    wo_a: Any         # [G, R, (H / G) * 512]
    wo_b: Any         # [D, G * R]
    c_wkv: Optional[Any] = None    # [coff * 512, D]
    c_wgate: Optional[Any] = None  # [coff * 512, D]
    c_ape: Optional[Any] = None    # [ratio, coff * 512]
    c_norm: Optional[Any] = None   # [512]
    i_wq_b: Optional[Any] = None   # [64 * 128, q_lora]
    i_wproj: Optional[Any] = None  # [64, D]
    i_wkv: Optional[Any] = None    # [256, D]
    i_wgate: Optional[Any] = None  # [256, D]
    i_ape: Optional[Any] = None    # [4, 256]
    i_norm: Optional[Any] = None   # [128]

    @property
    def ratio(self) -> int:
        return KINDS[self.kind]

    def to(self, xp) -> "AttentionWeights":
        """The same weights as arrays of ``xp`` (numpy or cupy)."""
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        return AttentionWeights(**{k: (v if k == "kind" or v is None else xp.asarray(v)) for k, v in vals.items()})


def _bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(BFLOAT16)


def random_attention_weights(cfg: Config, kind: str, seed: int = 0) -> AttentionWeights:
    """Seeded random weights (numpy); ``.to(cupy)`` moves them.  Scales keep activations of order 1."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    D, H, ql, G, R = cfg.dim, cfg.heads, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank

    def lin(out, inp):
        return _bf16(rng.standard_normal((out, inp)) / np.sqrt(inp))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = dict(kind=kind, hc_fn=(0.02 * rng.standard_normal((24, 4 * D))).astype(np.float32),
             hc_scale=np.array([1.0, 1.0, 1.0], np.float32) + 0.1 * rng.random(3).astype(np.float32),
             hc_base=(0.1 * rng.standard_normal(24)).astype(np.float32), attn_norm=norm(D),
             wq_a=lin(ql, D), q_norm=norm(ql), wq_b=lin(H * HEAD_DIM, ql), wkv=lin(HEAD_DIM, D), kv_norm=norm(HEAD_DIM),
             sink=rng.standard_normal(H).astype(np.float32),
             wo_a=_bf16(rng.standard_normal((G, R, cfg.group_width)) / np.sqrt(cfg.group_width)),
             wo_b=lin(D, G * R))
    r = KINDS[kind]
    if r:
        coff = 2 if r == 4 else 1
        w.update(c_wkv=lin(coff * HEAD_DIM, D), c_wgate=lin(coff * HEAD_DIM, D),
                 c_ape=(0.1 * rng.standard_normal((r, coff * HEAD_DIM))).astype(np.float32), c_norm=norm(HEAD_DIM))
    if r == 4:
        w.update(i_wq_b=lin(INDEX_HEADS * INDEX_DIM, ql), i_wproj=lin(INDEX_HEADS, D), i_wkv=lin(2 * INDEX_DIM, D),
                 i_wgate=lin(2 * INDEX_DIM, D), i_ape=(0.1 * rng.standard_normal((4, 2 * INDEX_DIM))).astype(np.float32),
                 i_norm=norm(INDEX_DIM))
    return AttentionWeights(**w)
