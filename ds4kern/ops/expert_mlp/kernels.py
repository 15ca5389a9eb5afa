"""expert_mlp's kernel sources (``cuda_src/expert_mlp/``), their instantiations, the shared-memory
layout and grid bound of the grouped kernels, and the choice of rows per group."""

from __future__ import annotations

from ...core import kernels
from ...core.launch import device_facts  # noqa: F401  (re-exported: ops call kernels.device_facts)

THREADS = 128            # grouped blocks: 4 warps (DS4_EM_THREADS)
TILE_ROWS = 64           # weight rows of a grouped block tile (DS4_EM_TILE_ROWS)
BK = 64                  # k per pipeline stage (DS4_EM_BK)
STAGES = 4               # cp.async pipeline depth (DS4_EM_STAGES)
GU_FEATURES = 32         # features per gate_up block: 32 gate + 32 up rows (DS4_EM_GU_FEATURES)
MAX_EXPERTS = 1024       # the item search's limit (DS4_EM_MAX_EXPERTS)
NAIVE_THREADS = 256      # naive's elementwise kernels (DS4_EM_NAIVE_THREADS)
TOKEN_GROUPS = (8, 16, 32, 64)  # rows per group of a grouped item (TN)
ALIGN = 64               # grouped: D and I multiples of this (a stage's k; 16-byte row chunks)


STATIC_SMEM = 64         # the item search's static shared memory (4 warp sums, one item), rounded up


def grouped_smem(tn: int) -> int:
    """Dynamic shared memory of a grouped block (EmLayout<TN>::BYTES): STAGES stages of 64 weight
    rows and TN rows of x / h, 128 bytes each; the epilogue tile reuses it."""
    return STAGES * (TILE_ROWS + tn) * 128


def grouped_block_smem(tn: int) -> int:
    """All the shared memory of a grouped block (dynamic + static): what must fit the device's
    opt-in limit, and the dynamic limit the launcher asks for (TN = 32 uses exactly 48 kB of
    dynamic memory, which with the static part is above the default limit)."""
    return grouped_smem(tn) + STATIC_SMEM


def gate_up_tiles(inter: int) -> int:
    return inter // GU_FEATURES


def down_tiles(dim: int) -> int:
    return dim // TILE_ROWS


def item_bound(rows: int, experts: int, tn: int, tiles: int) -> int:
    """Most items a call can have with valid offsets (at most ``rows`` rows over ``experts``
    experts): m experts with rows give at most m + (rows - m) / TN row groups (m = min(E, rows)),
    each ``tiles`` items.  The grid of a grouped launch."""
    m = min(experts, rows)
    return tiles * (m + (rows - m) // tn)


def default_tokens_per_group(rows: int, experts: int, dim: int, inter: int, sm_count: int) -> int:
    """TN of the grouped kernels: the smallest group that holds an expert's average share of rows
    (rows / E), so weights are streamed once per expert; smaller while the items would not give
    every multiprocessor two blocks (few experts with many rows, e.g. a shared expert at decode:
    the row groups of one tile then share its weights through L2).  Provisional until measured."""
    return tokens_per_group(rows, experts, min(gate_up_tiles(inter), down_tiles(dim)), sm_count)


def tokens_per_group(rows: int, experts: int, tiles: int, sm_count: int) -> int:
    """TN for launches of ``tiles`` output tiles per row group (see :func:`default_tokens_per_group`)."""
    avg = -(-max(rows, 1) // max(experts, 1))
    tn = next((t for t in TOKEN_GROUPS if t >= avg), TOKEN_GROUPS[-1])
    while tn > TOKEN_GROUPS[0] and item_bound(rows, experts, tn, tiles) < 2 * max(sm_count, 1):
        tn //= 2
    return tn


def gate_up_name(tn: int) -> str:
    return f"expert_mlp_gate_up<{tn}>"


def down_name(tn: int, out_f32: bool) -> str:
    return f"expert_mlp_down<{tn}, {'true' if out_f32 else 'false'}>"


def down_splitk_name(tn: int) -> str:
    return f"expert_mlp_down_splitk<{tn}>"


def split_reduce_name(out_f32: bool) -> str:
    return f"expert_mlp_split_reduce<{'true' if out_f32 else 'false'}>"


SPLITS = (2, 4, 8, 16)   # grouped_linear's split variant: k splits of I
REDUCE_THREADS = 256


OUT_TYPES = {"bfloat16": "__nv_bfloat16", "float32": "float"}
WIDEN_NAME = "expert_mlp_widen"
SWIGLU_NAME = "expert_mlp_swiglu"


def store_name(out_dtype: str) -> str:
    return f"expert_mlp_store<{OUT_TYPES[out_dtype]}>"


_F = kernels.KernelFamily
GROUPED = kernels.register_family(_F("expert_mlp/grouped.cu", tuple(gate_up_name(t) for t in TOKEN_GROUPS)
                                     + tuple(down_name(t, f) for t in TOKEN_GROUPS for f in (False, True))
                                     + tuple(down_splitk_name(t) for t in TOKEN_GROUPS)
                                     + tuple(split_reduce_name(f) for f in (False, True))))
NAIVE = kernels.register_family(_F("expert_mlp/naive.cu", (WIDEN_NAME, SWIGLU_NAME)
                                   + tuple(store_name(d) for d in OUT_TYPES)))
FAMILIES = (GROUPED, NAIVE)
