"""moe_permute / moe_unpermute variants (launchers, what each supports) and their registration.

moe_permute's CUDA variants differ in how the permutation is sorted (``single_block``: one
block; ``chunked``: count, scan and place kernels over chunks of 1024 entries); both then copy
x's rows with the same kernel (one block per token).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import allow_smem, grid, ptr
from ...core.registry import Variant
from . import kernels as K
from .api import PERMUTE_OP, UNPERMUTE_OP, MoePermuteArgs, MoePermuteProblem, MoeUnpermuteArgs
from .reference import reference_permute_variant, reference_unpermute_variant


def _experts_supported(p: MoePermuteProblem) -> Optional[str]:
    if p.num_experts > K.MAX_EXPERTS:
        return f"E={p.num_experts} > {K.MAX_EXPERTS}: the per-expert tables live in one block's shared memory"
    return None


def _scatter_rows(a: MoePermuteArgs) -> None:
    """x_perm[slot[t, j]] = x[t]: one block per token, copies of ``problem.copy_bytes``."""
    if a.x is None or a.dim == 0:
        return
    unit = a.problem.copy_bytes
    per = unit // a.x.itemsize
    kern = K.SCATTER.kernel(K.scatter_name(unit))
    kern((grid(a.num_tokens, PERMUTE_OP, "the row copy", "T"),), (K.SCATTER_THREADS,),
         (a.x, np.int64(a.x_rs // per), np.int32(a.dim // per), a.slot, np.int32(a.k), a.x_perm,
          np.int64(a.xp_rs // per), np.int64(a.x_perm.shape[0])))


# -- single_block -------------------------------------------------------------------------------


def _single_block_supports(p: MoePermuteProblem) -> Optional[str]:
    why = _experts_supported(p)
    if why:
        return why
    need = K.single_block_smem(p.num_experts) + K.SCAN_STATIC_SMEM
    if need > p.smem_per_block:
        return f"E={p.num_experts} needs {need} bytes of shared memory per block; the device offers {p.smem_per_block}"
    return None


def _single_block(a: MoePermuteArgs) -> None:
    E, n = a.num_experts, a.num_tokens * a.k
    kern = K.PERMUTE.kernel(K.single_block_name())
    smem = K.single_block_smem(E)
    # the limit is raised once per kernel (core.launch.allow_smem): raise it for the largest E the
    # device can run, not for this call's E, so a later call with a larger E still launches
    allow_smem(kern, min(K.single_block_smem(K.MAX_EXPERTS), a.problem.smem_per_block - K.SCAN_STATIC_SMEM))
    kern((1,), (K.SINGLE_THREADS,),
         (a.indices, np.int32(n), np.int32(E), a.counts, a.offsets, a.order, a.slot, ptr(a.errors)), shared_mem=smem)
    _scatter_rows(a)


# -- chunked ------------------------------------------------------------------------------------


def _chunked_supports(p: MoePermuteProblem) -> Optional[str]:
    why = _experts_supported(p)
    if why:
        return why
    need = K.chunk_smem(p.num_experts)
    if need > p.smem_per_block:
        return f"E={p.num_experts} needs {need} bytes of shared memory per block; the device offers {p.smem_per_block}"
    return None


def _chunked(a: MoePermuteArgs) -> None:
    E, n = a.num_experts, a.num_tokens * a.k
    C = K.chunks(n)
    counts_cx = a.frame.xp.empty(C * E, np.int32)  # every element is written by the count kernel
    smem = K.chunk_smem(E)
    count = K.PERMUTE.kernel(K.count_name())
    allow_smem(count, smem)
    count((grid(C, PERMUTE_OP, "the count kernel", "T"),), (K.CHUNK_THREADS,),
          (a.indices, np.int32(n), np.int32(E), counts_cx, ptr(a.errors)), shared_mem=smem)
    K.PERMUTE.kernel(K.scan_name())((1,), (K.SCAN_THREADS,), (counts_cx, np.int32(C), np.int32(E), a.counts, a.offsets))
    place = K.PERMUTE.kernel(K.place_name())
    allow_smem(place, smem)
    place((C,), (K.CHUNK_THREADS,),
          (a.indices, np.int32(n), np.int32(E), counts_cx, a.offsets, a.order, a.slot), shared_mem=smem)
    _scatter_rows(a)


# -- moe_unpermute ------------------------------------------------------------------------------


def _unpermute_naive(a: MoeUnpermuteArgs) -> None:
    p = a.problem
    kern = K.UNPERMUTE.kernel(K.unpermute_name(p.dtype, p.out_dtype, p.vec))
    kern((grid(a.num_tokens, UNPERMUTE_OP, "one block per token", "T"),), (K.UNPERMUTE_THREADS,),
         (a.y_perm, np.int64(a.y_rs), np.int64(a.y_perm.shape[0]), a.slot, a.weights, np.int32(a.k), np.int32(a.dim),
          a.out, np.int64(a.out_rs), ptr(a.errors)))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(PERMUTE_OP, "reference", "numpy", reference_permute_variant,
                     description="numpy: a stable argsort of the valid entries by expert"))
    register(Variant(PERMUTE_OP, "single_block", "cuda", _single_block, supports=_single_block_supports,
                     description="one block of 16 warps: per-warp expert counts in shared memory, a block scan, "
                                 "a stable placement (match_any ranks); then one block per token copies x"))
    register(Variant(PERMUTE_OP, "chunked", "cuda", _chunked, supports=_chunked_supports,
                     description="count / scan / place kernels over chunks of 1024 entries (the single block's "
                                 "sort spread over blocks); then one block per token copies x"))
    register(Variant(UNPERMUTE_OP, "reference", "numpy", reference_unpermute_variant,
                     description="numpy: float32 fixed-order sums over j, each step rounded"))
    register(Variant(UNPERMUTE_OP, "naive", "cuda", _unpermute_naive,
                     description="one block of 128 threads per token, 8 channels a thread (16-byte accesses) "
                                 "where the layout allows, else 1; fixed-order float32 sums"))
