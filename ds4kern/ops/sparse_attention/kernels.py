"""sparse_attention's kernel sources (``cuda_src/sparse_attention/``), their instantiations, the
shared-memory layout of the tensor-core kernel, the split_k plan, and the device facts they need."""

from __future__ import annotations

from ...core import kernels
from ...core.launch import device_facts  # noqa: F401  (re-exported: ops call kernels.device_facts)

THREADS = 256        # naive and head_batched blocks (DS4_SA_WARPS warps)
WARPS = 8
MERGE_THREADS = 128  # split_merge: one block per (row, head)
FP8_THREADS = 128    # pack / unpack: one warp per row
HEAD_GROUPS = (1, 2, 4)  # 16-head groups of a head_batched block (HG)
KV_TILES = (64, 32)      # slots per gathered KV tile (BK), the default first
ROW_SMEM = 1040          # padded shared row of 512 bf16
STAGE_ROW = 592          # 37 x 16 bytes covering one 584-byte FP8 row
HEAD_TILE_MAX = 16 * max(HEAD_GROUPS)


def head_groups(heads: int) -> int:
    """16-head groups per block: as many as the heads need, at most 4 (64 heads: the accumulators of
    64 heads x 512 dims fill half the register file)."""
    g = -(-heads // 16)
    return 1 if g <= 1 else (2 if g == 2 else 4)


def head_blocks(heads: int) -> int:
    """Blocks per query row: ceil(H / (16 * head_groups(H)))."""
    return -(-heads // (16 * head_groups(heads)))


def tile_ok(hg: int, kv_tile: int) -> bool:
    """Every S warp takes whole 8-slot mma tiles: kv_tile * hg / 8 must be a multiple of 8."""
    return (kv_tile * hg // WARPS) % 8 == 0 and (kv_tile * hg) % WARPS == 0


def head_batched_smem(hg: int, kv_tile: int, fp8: bool) -> int:
    """Dynamic shared memory of one head_batched block (HBLayout<HG, BK, FP8>::BYTES)."""
    ht, parts = 16 * hg, WARPS // hg
    q = ht * ROW_SMEM
    kv = (1 if fp8 else 2) * kv_tile * ROW_SMEM
    stage = 2 * kv_tile * STAGE_ROW if fp8 else 0
    p = ht * (kv_tile + 8) * 2
    small = 2 * parts * ht * 4 + 2 * ht * 4 + 2 * kv_tile
    return q + kv + stage + p + small


def kv_tiles_that_fit(heads: int, fp8: bool, smem_limit: int) -> tuple:
    """The KV tile sizes whose block fits ``smem_limit`` bytes of shared memory, default first."""
    hg = head_groups(heads)
    return tuple(bk for bk in KV_TILES if tile_ok(hg, bk) and head_batched_smem(hg, bk, fp8) <= smem_limit)


def split_k_plan(rows: int, heads: int, slots: int, kv_tile: int, sm_count: int) -> tuple:
    """``(splits, chunk)`` of the split_k variant: enough (row, head tile, split) blocks for one
    wave of ``sm_count`` blocks, each split a whole number of KV tiles, none empty."""
    tiles = -(-slots // kv_tile)
    per_row = head_blocks(heads) * max(rows, 1)
    want = max(1, -(-sm_count // per_row))
    splits = max(1, min(tiles, want))
    chunk = -(-tiles // splits) * kv_tile
    return -(-slots // chunk), chunk


def split_k_scratch_bytes(rows: int, heads: int, splits: int) -> int:
    """Device scratch of one split_k call: partial o and (m, l), float32, ``N * H * splits * 514 * 4``."""
    return rows * heads * splits * (512 + 2) * 4


# -- device facts (cached per device) ------------------------------------------------------




# -- kernel families -----------------------------------------------------------------------


def naive_name(fp8: bool) -> str:
    return f"sparse_attention_naive<{'true' if fp8 else 'false'}>"


def head_batched_name(hg: int, kv_tile: int, fp8: bool, partial: bool) -> str:
    return (f"sparse_attention_head_batched<{hg}, {kv_tile}, {'true' if fp8 else 'false'}, "
            f"{'true' if partial else 'false'}>")


MERGE_NAME = "sparse_attention_split_merge"
PACK_NAME = "sparse_attention_pack_fp8"
UNPACK_NAME = "sparse_attention_unpack_fp8"

_F = kernels.KernelFamily
NAIVE = kernels.register_family(_F("sparse_attention/naive.cu", tuple(naive_name(f) for f in (False, True))))
HEAD_BATCHED = kernels.register_family(_F("sparse_attention/head_batched.cu", tuple(
    head_batched_name(hg, bk, f, p) for hg in HEAD_GROUPS for bk in KV_TILES if tile_ok(hg, bk)
    for f in (False, True) for p in (False, True))))
MERGE = kernels.register_family(_F("sparse_attention/split_merge.cu", (MERGE_NAME,)))
FP8 = kernels.register_family(_F("sparse_attention/fp8.cu", (PACK_NAME, UNPACK_NAME)))
SLOTS_NAME = "sparse_attention_decode_slots"
SLOTS_THREADS = 256
SLOTS = kernels.register_family(_F("sparse_attention/slots.cu", (SLOTS_NAME,)))
FAMILIES = (NAIVE, HEAD_BATCHED, MERGE, FP8, SLOTS)

