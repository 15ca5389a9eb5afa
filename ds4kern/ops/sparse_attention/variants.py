"""sparse_attention's variants (launchers, what each supports) and their registration."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import NULL, allow_smem as _allow_smem, ptr as _ptr
from ...core.launch import grid as _core_grid
from ...core.registry import Variant
from . import kernels as K
from .api import OP, SparseAttentionArgs, SparseAttentionProblem
from .reference import reference_variant

LOG2E = 1.4426950408889634


def _rope_args(a: SparseAttentionArgs) -> tuple:
    if a.positions is None:
        return (NULL, np.int32(0), NULL, NULL, np.int64(0))
    return (a.positions, np.int32(a.positions.dtype == np.int64), a.rope_cos, a.rope_sin,
            np.int64(a.rope_cos.shape[0]))


def _fp8(p: SparseAttentionProblem) -> bool:
    return p.kv_format == "fp8"


def _grid(blocks: int, what: str = "the launch") -> int:
    return _core_grid(blocks, "sparse_attention", what, "N")


# -- naive ------------------------------------------------------------------------------------


def _naive(a: SparseAttentionArgs) -> None:
    N, H = a.rows, a.heads
    kern = K.NAIVE.kernel(K.naive_name(_fp8(a.problem)))
    kern((_grid(N * H, "naive (N * H)"),), (K.THREADS,),
         (a.q, a.kv, np.int64(a.kv_stride), np.int64(a.pool_rows), a.indices, np.int32(a.slots), a.sink,
          np.int32(H), np.float32(a.scale * LOG2E)) + _rope_args(a) + (a.out, _ptr(a.lse), _ptr(a.errors)))


# -- head_batched -----------------------------------------------------------------------------


def _tiles(p: SparseAttentionProblem) -> tuple:
    return K.kv_tiles_that_fit(p.heads, _fp8(p), p.smem_per_block)


def _head_batched_configs(p: SparseAttentionProblem) -> list:
    return [{"kv_tile": t} for t in _tiles(p)]


def _smem_reason(p: SparseAttentionProblem) -> Optional[str]:
    if _tiles(p):
        return None
    hg = K.head_groups(p.heads)
    need = min(K.head_batched_smem(hg, t, _fp8(p)) for t in K.KV_TILES if K.tile_ok(hg, t))
    return f"a block of {16 * hg} heads needs {need} bytes of shared memory; the device offers {p.smem_per_block}"


def _launch_tiles(a: SparseAttentionArgs, kv_tile: int, partial: bool, splits: int = 1, chunk: int = 0,
                  part_o=None, part_ml=None) -> None:
    p = a.problem
    fp8 = _fp8(p)
    hg = K.head_groups(a.heads)
    if kv_tile not in K.KV_TILES or not K.tile_ok(hg, kv_tile):
        raise ValueError(f"kv_tile must be one of {[t for t in K.KV_TILES if K.tile_ok(hg, t)]} for H={a.heads}, "
                         f"got {kv_tile!r}")
    smem = K.head_batched_smem(hg, kv_tile, fp8)
    kern = K.HEAD_BATCHED.kernel(K.head_batched_name(hg, kv_tile, fp8, partial))
    _allow_smem(kern, smem)
    hb = K.head_blocks(a.heads)
    rope = (NULL, np.int32(0), NULL, NULL, np.int64(0)) if partial else _rope_args(a)
    outs = (NULL, NULL, part_o, part_ml) if partial else (a.out, _ptr(a.lse), NULL, NULL)
    kern((_grid(hb * splits * a.rows, "head_batched (head tiles * splits * N)"),), (K.THREADS,),
         (a.q, a.kv, np.int64(a.kv_stride), np.int64(a.pool_rows), a.indices, np.int32(a.slots), a.sink,
          np.int32(a.heads), np.int32(hb), np.float32(a.scale * LOG2E)) + rope + outs
         + (np.int32(chunk), np.int32(splits), _ptr(a.errors)),
         shared_mem=smem)


def _head_batched(a: SparseAttentionArgs, kv_tile: int = K.KV_TILES[0]) -> None:
    _launch_tiles(a, kv_tile, partial=False)


# -- split_k ----------------------------------------------------------------------------------


def split_plan(a: SparseAttentionArgs, kv_tile: int) -> tuple:
    """``(splits, chunk)`` of a split_k call on the call's device."""
    sm = K.device_facts(a.frame.device_id)[1]
    return K.split_k_plan(a.rows, a.heads, a.slots, kv_tile, sm)


def _split_k(a: SparseAttentionArgs, kv_tile: int = K.KV_TILES[-1]) -> None:
    N, H = a.rows, a.heads
    splits, chunk = split_plan(a, kv_tile)
    xp = a.frame.xp
    part_o = xp.empty((N, H, splits, 512), np.float32)
    part_ml = xp.empty((N, H, splits, 2), np.float32)
    _launch_tiles(a, kv_tile, partial=True, splits=splits, chunk=chunk, part_o=part_o, part_ml=part_ml)
    merge = K.MERGE.kernel(K.MERGE_NAME)
    merge((_grid(N * H, "split_k merge (N * H)"),), (K.MERGE_THREADS,),
          (part_o, part_ml, np.int32(splits), np.int32(H), a.sink) + _rope_args(a)
          + (a.out, _ptr(a.lse), _ptr(a.errors)))


def _split_k_configs(p: SparseAttentionProblem) -> list:
    tiles = sorted(_tiles(p))  # the smaller tile first: more, shorter splits (provisional)
    return [{"kv_tile": t} for t in tiles]


def _split_k_supports(p: SparseAttentionProblem) -> Optional[str]:
    if p.slots_bucket <= min(K.KV_TILES):
        return f"K <= {min(K.KV_TILES)} slots: a single KV tile, nothing to split"
    return _smem_reason(p)


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", reference_variant,
                     description="numpy, float64 accumulation, one query row at a time; checks slots and positions"))
    register(Variant(OP, "naive", "cuda", _naive,
                     description="CUDA cores, one block per (row, head); any H, K and KV format"))
    register(Variant(OP, "head_batched", "cuda", _head_batched, supports=_smem_reason,
                     configs=_head_batched_configs,
                     description="tensor cores (mma.sync bf16), one block per (row, tile of up to 64 heads); "
                                 "each gathered KV tile serves every head of the tile; FP8 dequantised in shared memory"))
    register(Variant(OP, "split_k", "cuda", _split_k, supports=_split_k_supports, configs=_split_k_configs,
                     description="head_batched blocks over runs of a row's slots writing float32 partials, then "
                                 "a merge kernel; for small N"))
