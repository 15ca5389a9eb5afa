"""topk_rows' variants (launchers, what each supports) and their registration."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import NULL, allow_smem as _allow_smem, ptr as _ptr
from ...core.launch import grid as _core_grid
from ...core.registry import Variant
from . import kernels as K
from .api import OP, TopkArgs, TopkProblem
from .reference import reference_variant


def _grid(blocks: int, what: str = "the launch") -> int:
    return _core_grid(blocks, "topk_rows", what, "R")


# -- radix ------------------------------------------------------------------------------------


def _radix_configs(p: TopkProblem) -> list:
    """Chunk sizes (keys per thread) whose block fits the device, the static default first: one
    chunk per row where the row fits; for longer rows the fewest levels (level 0 plus merges),
    then the smallest chunk level 0 really launches (the most blocks).  Measured on an H100 (2026-12-06, graph
    replays): R=8 C=262144 k=512 per_thread 16 (2 levels) 60.2 us, 32 (2) 70.3, 8 (3) 76.4;
    k=1024: 32 (2) 75.9, 8 (3) 83.4, 16 (3) 87.3; R=1 C=65536 k=1024 (all 2): 8 44.0, 16 49.8,
    32 61.0; R=64 C=65536 k=1024 (all 2): 8 77.8, 16 79.1, 32 87.9."""
    fits = [per for per in K.PER_THREAD if K.radix_smem(per) <= p.smem_per_block]
    if not fits:
        return []
    fit_row = [per for per in fits if K.chunk_of(per) >= p.cols_bucket and K.chunk_of(per) >= 4 * p.k_bucket]
    if fit_row:
        first = min(fit_row)
    else:
        # rank by the chunk level 0 really launches (one of fewer than 4 k keys runs as the largest)
        first = min(fits, key=lambda per: (len(K.radix_plan(p.cols_bucket, p.k_bucket, per)),
                                           K.level_per(0, p.cols_bucket, p.k_bucket, per), -per))
    return [{"per_thread": first}] + [{"per_thread": per} for per in fits if per != first]


def _radix_supports(p: TopkProblem) -> Optional[str]:
    if max(K.PER_THREAD) not in [c["per_thread"] for c in _radix_configs(p)]:
        return (f"a merge block needs {K.radix_smem(max(K.PER_THREAD))} bytes of shared memory; the device offers "
                f"{p.smem_per_block}")
    return None


def _radix(a: TopkArgs, per_thread: int = max(K.PER_THREAD)) -> None:
    if per_thread not in K.PER_THREAD:
        raise ValueError(f"per_thread must be one of {K.PER_THREAD}, got {per_thread!r}")
    R, C, k = a.rows, a.cols, a.k
    levels = K.radix_plan(C, k, per_thread)
    per0 = K.level_per(0, C, k, per_thread)
    xp = a.frame.xp
    final0 = len(levels) == 1
    bufs = [None, None]
    if not final0:
        bufs[0] = (xp.empty(R * levels[0] * k, np.uint32), xp.empty(R * levels[0] * k, np.int32))
    kern = K.RADIX.kernel(K.rows_name(a.problem.dtype, per0, final0))
    smem = K.radix_smem(per0)
    _allow_smem(kern, smem)
    cand = bufs[0] or (NULL, NULL)
    kern((_grid(R * levels[0]),), (K.THREADS,),
         (a.scores, np.int64(a.row_stride), np.int32(C), _ptr(a.lengths), np.int32(levels[0]), np.int32(k),
          cand[0], cand[1], a.out, _ptr(a.errors)), shared_mem=smem)
    smem = K.radix_smem(max(K.PER_THREAD))
    for i in range(1, len(levels)):
        final = levels[i] == 1
        src = bufs[(i - 1) % 2]
        if not final:
            if bufs[i % 2] is None or bufs[i % 2][0].size < R * levels[i] * k:
                bufs[i % 2] = (xp.empty(R * levels[i] * k, np.uint32), xp.empty(R * levels[i] * k, np.int32))
            dst = bufs[i % 2]
        else:
            dst = (NULL, NULL)
        merge = K.RADIX.kernel(K.merge_name(final))
        _allow_smem(merge, smem)
        merge((_grid(R * levels[i]),), (K.THREADS,),
              (src[0], src[1], np.int32(levels[i - 1] * k), np.int32(levels[i]), np.int32(k), dst[0], dst[1],
               a.out if final else NULL), shared_mem=smem)


# -- sort -------------------------------------------------------------------------------------


def _sort_supports(p: TopkProblem) -> Optional[str]:
    if p.cols_bucket > K.SORT_MAX_COLS:
        return f"C > {K.SORT_MAX_COLS}: the whole row must fit one block's shared memory"
    need = K.sort_smem(p.cols_bucket)
    if need > p.smem_per_block:
        return f"a row of {p.cols_bucket} 64-bit keys needs {need} bytes of shared memory; the device offers {p.smem_per_block}"
    return None


def _sort(a: TopkArgs) -> None:
    n2 = max(1, 1 << max(0, (a.cols - 1).bit_length()))
    kern = K.SORT.kernel(K.sort_name(a.problem.dtype))
    smem = K.sort_smem(a.cols)
    _allow_smem(kern, smem)
    kern((_grid(a.rows),), (K.THREADS,),
         (a.scores, np.int64(a.row_stride), np.int32(a.cols), _ptr(a.lengths), np.int32(n2), np.int32(a.k), a.out,
          _ptr(a.errors)), shared_mem=smem)


# -- hist -------------------------------------------------------------------------------------


def _hist_supports(p: TopkProblem) -> Optional[str]:
    if p.k_bucket > K.MAX_K:
        return f"k > {K.MAX_K}: the winners are sorted in one block's shared memory"
    return None


def _hist(a: TopkArgs) -> None:
    R, C, k = a.rows, a.cols, a.k
    if R == 0:
        return
    xp = a.frame.xp
    slices = K.hist_slices(C)
    dt = a.problem.dtype
    ws = xp.zeros(R * (K.HIST_STATE + K.HIST_BINS), np.int32)  # row state, then the histograms
    state, hist = ws[:R * K.HIST_STATE], ws[R * K.HIST_STATE:]
    ties = xp.empty(R * slices, np.int32)
    cand = xp.empty(R * k, np.uint64)
    grid = (_grid(R * slices, f"R={R} rows x {slices} slices of {K.HIST_SLICE} columns"),)
    head = (a.scores, np.int64(a.row_stride), np.int32(C), _ptr(a.lengths), np.int32(slices))
    rnd = K.HIST.kernel(K.hist_name("round", dt))
    for r in range(K.HIST_ROUNDS):
        rnd(grid, (K.HIST_THREADS,), head + (np.int32(k), np.int32(r), hist, state, _ptr(a.errors)))
    K.HIST.kernel(K.hist_name("ties", dt))(grid, (K.HIST_THREADS,), head + (state, ties))
    K.HIST.kernel(K.hist_name("collect", dt))(grid, (K.HIST_THREADS,), head + (np.int32(k), state, ties, cand))
    K.HIST.kernel(K.hist_name("sort"))((_grid(R),), (K.THREADS,), (cand, state, np.int32(k), a.out))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", reference_variant,
                     description="numpy: a stable sort of each row's keys"))
    register(Variant(OP, "sort", "cuda", _sort, supports=_sort_supports,
                     description="one block per row sorts the whole row in shared memory (C <= 8192); "
                                 "the reference's GPU twin"))
    register(Variant(OP, "radix", "cuda", _radix, supports=_radix_supports, configs=_radix_configs,
                     description="radix select over keys staged in shared memory (8-bit digits), ordered compaction, "
                                 "bitonic sort of the k winners; long rows in chunks merged by further levels"))
    register(Variant(OP, "hist", "cuda", _hist, supports=_hist_supports, autotune_only=True,
                     description="many blocks per row (slices of 4096 columns): three rounds of global 11/11/10-bit "
                                 "digit histograms find the k-th key, one pass collects the winners, one block per "
                                 "row sorts them; slower than radix everywhere measured on an H100 (R=8 C=262144 "
                                 "k=512: 68 vs 60 us), so only the autotuner may pick it"))
