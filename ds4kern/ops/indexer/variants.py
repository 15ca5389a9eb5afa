"""indexer_topk's variants (launchers, what each supports) and their registration.

Every CUDA variant is one logits kernel into float32 ``[T, C]`` (the caller's logits with
``return_logits``, else device scratch), then the ``topk_rows`` op on it: the selection runs
whatever topk_rows' own dispatch picks (its rule, overrides and autotune)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import allow_smem as _allow_smem, ptr as _ptr
from ...core.launch import grid as _core_grid
from ...core.registry import Variant
from ..topk.api import topk_rows
from . import kernels as K
from .api import OP, IndexerArgs, IndexerProblem
from .reference import reference_variant

MMA_MIN_CC = 80  # mma.sync bf16, ldmatrix, cp.async


def _fp8(p: IndexerProblem) -> bool:
    return p.key_format == "fp8"


def _logits(a: IndexerArgs):
    """Where the logits kernel writes: the caller's logits, or scratch (columns beyond a token's
    length are then never written: topk_rows does not read them)."""
    if a.logits is not None:
        return a.logits, 1
    return a.frame.xp.empty((a.tokens, a.cols), np.float32), 0


def _select(a: IndexerArgs, logits) -> None:
    if a.cols == 0:
        a.out.fill(-1)
        return
    topk_rows(logits, a.k, lengths=a.lengths, out=a.out)


def _common(a: IndexerArgs) -> tuple:
    return (a.q, a.w, a.keys, _ptr(a.key_scales), _ptr(a.block_table), np.int32(a.max_pages), np.int64(a.pages),
            np.int32(a.cols))


def _grid(blocks: int, what: str = "the launch") -> int:
    return _core_grid(blocks, "indexer_topk", what, "T")


# -- naive ------------------------------------------------------------------------------------


def _naive(a: IndexerArgs) -> None:
    logits, fill = _logits(a)
    if a.cols > 0:
        cb = K.naive_blocks(a.cols)
        kern = K.NAIVE.kernel(K.naive_name(_fp8(a.problem)))
        kern((_grid(a.tokens * cb, "naive (T * C / 256)"),), (K.NAIVE_THREADS,),
             _common(a) + (np.int32(a.per_token), a.lengths, np.int32(cb), logits, np.int32(fill), _ptr(a.errors)))
    _select(a, logits)


# -- mma --------------------------------------------------------------------------------------


def mma_launch(a: IndexerArgs) -> tuple:
    """``(tokens per block, run, runs, groups, shared memory bytes)`` of an mma call on its device."""
    tg = K.tokens_per_block(a.tokens, not a.per_token)
    sm = K.device_facts(a.frame.device_id)[1]
    run, runs, groups = K.mma_plan(a.tokens, a.cols, tg, sm)
    return tg, run, runs, groups, K.mma_smem(tg, _fp8(a.problem))


def _mma(a: IndexerArgs) -> None:
    logits, fill = _logits(a)
    if a.cols > 0:
        tg, run, runs, groups, smem = mma_launch(a)
        kern = K.MMA.kernel(K.mma_name(tg, _fp8(a.problem)))
        _allow_smem(kern, smem)
        kern((_grid(runs * groups, "mma (key tile runs * token groups)"),), (K.MMA_THREADS,),
             _common(a) + (np.int32(a.tokens), np.int32(a.per_token), a.lengths, np.int32(groups), np.int32(run),
                           logits, np.int32(fill), _ptr(a.errors)),
             shared_mem=smem)
    _select(a, logits)


def _mma_supports(p: IndexerProblem) -> Optional[str]:
    if p.cc and p.cc < MMA_MIN_CC:
        return f"needs sm_80 or newer (mma.sync bf16, cp.async); the device is sm_{p.cc}"
    tg = K.tokens_per_block(p.tokens_bucket, p.shared_keys)
    need = K.mma_smem(tg, _fp8(p))
    if need > p.smem_per_block:
        return f"a block of {tg} token(s) needs {need} bytes of shared memory; the device offers {p.smem_per_block}"
    return None


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", reference_variant,
                     description="numpy: float64 logits, then topk_rows' reference on their float32 rounding; "
                                 "checks lengths and pages"))
    register(Variant(OP, "naive", "cuda", _naive,
                     description="CUDA cores, one thread per key column (the reference's GPU twin), then topk_rows "
                                 "(its own dispatch picks the selection variant)"))
    register(Variant(OP, "mma", "cuda", _mma, supports=_mma_supports,
                     description="tensor cores (mma.sync bf16, float32 accumulation), a block per (token group, run "
                                 "of 64-key tiles), fp8 keys converted to bf16 in shared memory; then topk_rows (its "
                                 "own dispatch picks the selection variant)"))
