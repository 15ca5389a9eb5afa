"""DeepSeek-V4 configurations: the public Flash and Pro dimensions, and a small one for tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

HEAD_DIM = 512   # nope 448 + rope 64 (the kernels' fixed row width)
ROPE_DIM = 64
INDEX_HEADS = 64
INDEX_DIM = 128
KINDS = {"swa": 0, "csa": 4, "hca": 128}


@dataclass(frozen=True)
class Config:
    name: str
    dim: int               # hidden size D
    heads: int             # query heads H (one KV head, K = V)
    q_lora_rank: int
    o_groups: int          # G: heads per group = H / G
    o_lora_rank: int       # R
    window: int = 128
    index_topk: int = 512
    max_context: int = 1 << 20   # positions 0 .. max_context - 1 the caches hold
    rope_theta: float = 10000.0          # SWA layers (no YaRN)
    compress_rope_theta: float = 160000.0  # CSA / HCA layers (with YaRN)
    yarn_factor: float = 16.0
    yarn_original: int = 65536
    norm_eps: float = 1e-6
    hc_eps: float = 1e-6
    sinkhorn_iters: int = 20
    # MoE block
    experts: int = 256         # routed experts E
    experts_per_token: int = 6  # k
    route_scale: float = 1.5   # routed_scaling_factor
    moe_inter: int = 2048      # expert intermediate size I (routed and shared)
    swiglu_limit: float = 10.0
    hash_layers: int = 3       # layers 0 .. hash_layers - 1 route by the token-id table
    vocab: int = 129280
    ratios: tuple = ()         # compress ratio of each layer (0 SWA, 4 CSA, 128 HCA)

    def __post_init__(self):
        if self.heads % self.o_groups:
            raise ValueError(f"heads ({self.heads}) must be a multiple of o_groups ({self.o_groups})")
        if self.window != 128:
            raise ValueError("window must be 128 (DeepSeek-V4's sliding window)")
        bad = [r for r in self.ratios if r not in KINDS.values()]
        if bad:
            raise ValueError(f"ratios must be 0, 4 or 128 per layer, got {bad[0]!r}")
        if not 1 <= self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token must be in [1, experts={self.experts}], got {self.experts_per_token}")

    @property
    def layers(self) -> int:
        return len(self.ratios)

    def kind(self, layer: int) -> str:
        """``"swa"``, ``"csa"`` or ``"hca"``: the attention kind of a layer."""
        if isinstance(layer, bool) or not 0 <= int(layer) < self.layers:
            raise ValueError(f"layer must be in [0, {self.layers}), got {layer!r}")
        return {v: k for k, v in KINDS.items()}[self.ratios[int(layer)]]

    def is_hash(self, layer: int) -> bool:
        """Whether a layer routes by the token-id table (the first ``hash_layers`` layers)."""
        return int(layer) < self.hash_layers

    @property
    def group_width(self) -> int:
        return self.heads // self.o_groups * HEAD_DIM

    def rows(self, ratio: int) -> int:
        """Compressed rows a sequence can hold at this ratio."""
        return 0 if ratio == 0 else self.max_context // ratio

    def with_context(self, max_context: int) -> "Config":
        return replace(self, max_context=int(max_context))


def flash(max_context: int = 1 << 20) -> Config:
    """DeepSeek-V4-Flash: 43 layers, SWA, SWA, then CSA / HCA alternating, the last one CSA."""
    return Config("flash", 4096, 64, 1024, 8, 1024, index_topk=512, max_context=max_context,
                  ratios=(0, 0) + (4, 128) * 20 + (4,))


def pro(max_context: int = 1 << 20) -> Config:
    """DeepSeek-V4-Pro: 61 layers, HCA, HCA, then CSA / HCA alternating, the last one CSA."""
    return Config("pro", 7168, 128, 1536, 16, 1024, index_topk=1024, max_context=max_context, experts=384,
                  route_scale=2.5, moe_inter=3072, ratios=(128, 128) + (4, 128) * 29 + (4,))


def small(max_context: int = 2048) -> Config:
    """Real head and indexer widths (the kernels' fixed sizes), small everything else; four layers
    (hash-routed SWA, then CSA, HCA, CSA) so a step meets every layer and router kind."""
    return Config("small", 256, 16, 128, 2, 64, index_topk=16, max_context=max_context, yarn_original=256,
                  experts=64, moe_inter=128, hash_layers=1, vocab=1000, ratios=(0, 4, 128, 4))
