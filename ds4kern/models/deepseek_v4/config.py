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

    def __post_init__(self):
        if self.heads % self.o_groups:
            raise ValueError(f"heads ({self.heads}) must be a multiple of o_groups ({self.o_groups})")
        if self.window != 128:
            raise ValueError("window must be 128 (DeepSeek-V4's sliding window)")

    @property
    def group_width(self) -> int:
        return self.heads // self.o_groups * HEAD_DIM

    def rows(self, ratio: int) -> int:
        """Compressed rows a sequence can hold at this ratio."""
        return 0 if ratio == 0 else self.max_context // ratio

    def with_context(self, max_context: int) -> "Config":
        return replace(self, max_context=int(max_context))


def flash(max_context: int = 1 << 20) -> Config:
    return Config("flash", 4096, 64, 1024, 8, 1024, index_topk=512, max_context=max_context)


def pro(max_context: int = 1 << 20) -> Config:
    return Config("pro", 7168, 128, 1536, 16, 1024, index_topk=1024, max_context=max_context)


def small(max_context: int = 2048) -> Config:
    """Real head and indexer widths (the kernels' fixed sizes), small everything else."""
    return Config("small", 256, 16, 128, 2, 64, index_topk=16, max_context=max_context, yarn_original=256)
