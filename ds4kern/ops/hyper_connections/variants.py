"""The hyper-connections' variants (launchers, what each supports) and their registration.

``naive``, ``grouped`` and ``split`` of hc_pre / hc_post_pre are launch shapes of one kernel per
op (``cuda_src/hyper_connections/pre.cu``, ``post_pre.cu``): blocks over (token group of TOK
tokens, slice of the channels).  naive: TOK = 1, one slice, 256 threads.  grouped: TOK = 2 or 4
(the ``tokens_per_block`` setting), one slice, 128 threads.  split: TOK from B, several slices,
128 threads, closed by the group's last block.  ``grouped`` means tokens sharing a block, as the
compressor's ``grouped`` means batch rows sharing one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.registry import Variant
from . import kernels as K
from .api import POST_OP, POST_PRE_OP, PRE_OP, HcArgs, HcProblem
from .reference import reference_post_pre_variant, reference_post_variant, reference_pre_variant

NULL = np.uint64(0)
MAX_GRID = 2 ** 31 - 1


def _grid(blocks: int, what: str) -> int:
    if blocks > MAX_GRID:
        raise ValueError(f"hyper-connections: {what} needs {blocks} blocks, beyond the grid limit {MAX_GRID}; "
                         "split the call along B")
    return blocks


def _mix_params(a: HcArgs) -> tuple:
    """hc_fn, hc_scale (device pointer or null, then three values), hc_base, eps, iterations."""
    if a.hc_scale_dev is not None:
        scale = (a.hc_scale_dev, np.float32(0), np.float32(0), np.float32(0))
    else:
        scale = (NULL,) + tuple(np.float32(s) for s in a.hc_scale)
    return ((a.hc_fn,) + scale + (a.hc_base, np.float32(a.norm_eps), np.float32(a.hc_eps), np.int32(a.iters)))


def _launch(a: HcArgs, tok: int, threads: int, slices: int) -> None:
    """One launch of hc_pre / hc_post_pre with TOK = tok tokens per block and ``slices`` blocks
    per token group."""
    p = a.problem
    B, D = a.tokens, a.dim
    groups = -(-B // tok)
    if slices > 1:
        counters, part = K.workspace(a.frame, groups, groups * slices * K.SLOT * tok)
    else:
        counters, part = NULL, NULL
    grid = (_grid(groups * slices, f"B={B} in groups of {tok} x {slices} slices"),)
    tail = (np.int32(slices), part, counters, a.x_in, a.post, a.comb)
    if a.y is None:
        kern = K.PRE.kernel(K.pre_name(p.dtype, p.vec, tok, threads))
        kern(grid, (threads,), (a.X, np.int64(a.x_ts), np.int64(a.x_hs), np.int64(B), np.int32(D))
             + _mix_params(a) + tail)
    else:
        kern = K.POST_PRE.kernel(K.post_pre_name(p.dtype, p.y_dtype, p.vec, tok, threads))
        kern(grid, (threads,),
             (a.y, np.int64(a.y_ts), a.X, np.int64(a.x_ts), np.int64(a.x_hs), a.post_in, a.comb_in,
              a.X_new, np.int64(a.n_ts), np.int64(a.n_hs), np.int64(B), np.int32(D)) + _mix_params(a) + tail)


def _naive(a: HcArgs) -> None:
    _launch(a, *K.NAIVE_LAUNCH, 1)


def _grouped(a: HcArgs, tokens_per_block: int = K.GROUPED_TOKENS[0]) -> None:
    if tokens_per_block not in K.GROUPED_TOKENS:
        raise ValueError(f"tokens_per_block must be one of {K.GROUPED_TOKENS}, got {tokens_per_block!r}")
    _launch(a, tokens_per_block, K.BLOCK_THREADS, 1)


def _split(a: HcArgs, slice_chunks: int = K.SPLIT_SLICE_CHUNKS) -> None:
    if slice_chunks not in K.SPLIT_SLICE_CHOICES:
        raise ValueError(f"slice_chunks must be one of {K.SPLIT_SLICE_CHOICES}, got {slice_chunks!r}")
    tok, slices = K.split_plan(a.tokens, a.dim, a.problem.vec, K.sm_count(a.frame.device_id), slice_chunks)
    _launch(a, tok, K.BLOCK_THREADS, slices)


def _split_configs(p: HcProblem) -> list:
    """Every slice size that still splits the problem (the default first)."""
    return [{"slice_chunks": c} for c in K.SPLIT_SLICE_CHOICES if K.split_max_slices(p.dim, p.vec, c) >= 2]


def _tiled(a: HcArgs) -> None:
    """Two launches: the dots as a tiled product with split-K partial sums, then per 4 tokens the
    ordered sum of the partials, the finish and x_in (pre_tiled.cu)."""
    p = a.problem
    B, D = a.tokens, a.dim
    if B == 0:
        return
    KS = K.tiled_slices(B, D, a.X.dtype.itemsize, K.sm_count(a.frame.device_id))
    tiles = -(-B // K.TILE_TOKENS)
    part = a.frame.xp.empty(KS * B * K.SLOT, np.float32)
    dots = K.PRE_TILED.kernel(K.tiled_dots_name(p.dtype))
    dots((_grid(tiles * KS, f"B={B} in tiles of {K.TILE_TOKENS} x {KS} slices"),), (K.TILE_THREADS,),
         (a.X, np.int64(a.x_ts), np.int64(a.x_hs), np.int64(B), np.int32(D), a.hc_fn, np.int32(KS), part))
    mix = _mix_params(a)  # hc_fn, the scale (pointer + three values), hc_base, eps, iterations
    fin = K.PRE_TILED.kernel(K.tiled_finish_name(p.dtype))
    fin((_grid(-(-B // 4), f"B={B} in groups of 4"),), (128,),
        (a.X, np.int64(a.x_ts), np.int64(a.x_hs), np.int64(B), np.int32(D)) + mix[1:] + (np.int32(KS), part,
                                                                                          a.x_in, a.post, a.comb))


def _post_pre_tiled(a: HcArgs) -> None:
    """hc_post_pre in three launches: the post kernel writes X_new (rounded to X's dtype, in place
    when X_new is X), then the tiled pre runs on X_new as stored (its two launches)."""
    if a.tokens == 0:
        return
    _post_naive(a)
    _tiled(replace(a, X=a.X_new, x_ts=a.n_ts, x_hs=a.n_hs, y=None))


def _tiled_supports(p: HcProblem) -> Optional[str]:
    if p.vec != 4:
        return "needs 4-channel accesses (X, hc_fn and x_in aligned, D a multiple of 4)"
    if p.dim % K.TILE_CH:
        return f"D={p.dim} is not a multiple of {K.TILE_CH} (a chunk of channels lies in one stream)"
    return None


def _grouped_supports(p: HcProblem) -> Optional[str]:
    if p.tokens_bucket < 2:
        return "a single token: nothing to group"
    return None


def _grouped_configs(p: HcProblem) -> list:
    return [{"tokens_per_block": t} for t in K.GROUPED_TOKENS]


def _split_supports(p: HcProblem) -> Optional[str]:
    if K.split_max_slices(p.dim, p.vec) < 2:
        return (f"D={p.dim}: fewer than {2 * K.SPLIT_SLICE_CHUNKS} chunks of {p.vec} channel(s), "
                "too few to split")
    return None


def _post_naive(a: HcArgs) -> None:
    p = a.problem
    B, D = a.tokens, a.dim
    per_token = -(-(D // p.vec) // K.POST_THREADS)
    kern = K.POST.kernel(K.post_name(p.dtype, p.y_dtype, p.vec))
    kern((_grid(B * per_token, f"B={B} x {per_token} channel runs"),), (K.POST_THREADS,),
         (a.y, np.int64(a.y_ts), a.X, np.int64(a.x_ts), np.int64(a.x_hs), a.post_in, a.comb_in,
          a.X_new, np.int64(a.n_ts), np.int64(a.n_hs), np.int64(B), np.int32(D), np.int32(per_token)))


_MIX_DESCRIPTIONS = {
    "naive": "one block of 256 threads per token: 24 dot products and the sum of squares, block "
             "reduction, finish, x_in from the block's own (L2-resident) streams",
    "grouped": "2 or 4 tokens per block of 128 threads (tokens_per_block): each hc_fn element loaded "
               "serves every token of the block; for large B where tiled cannot run",
    "split": "each token group's channels spread over several blocks (at least slice_chunks chunks each) "
             "writing partial sums; the last block (atomic counter) adds them in slice order, finishes and "
             "writes x_in; for small B",
}


@hookimpl
def ds4kern_register_variants(register):
    for op, ref in ((PRE_OP, reference_pre_variant), (POST_PRE_OP, reference_post_pre_variant)):
        register(Variant(op, "reference", "numpy", ref,
                         description="numpy, float64 throughout (Sinkhorn included); the oracle of the GPU tests"))
        register(Variant(op, "naive", "cuda", _naive, description=_MIX_DESCRIPTIONS["naive"]))
        register(Variant(op, "grouped", "cuda", _grouped, supports=_grouped_supports, configs=_grouped_configs,
                         description=_MIX_DESCRIPTIONS["grouped"]))
        register(Variant(op, "split", "cuda", _split, supports=_split_supports, configs=_split_configs,
                         description=_MIX_DESCRIPTIONS["split"]))
    register(Variant(POST_PRE_OP, "tiled", "cuda", _post_pre_tiled, supports=_tiled_supports,
                     description="hc_post's kernel writes X_new, then hc_pre's tiled product and finish on X_new as "
                                 "stored: three launches, X_new read back twice; the rule's pick from B bucket 512"))
    register(Variant(PRE_OP, "tiled", "cuda", _tiled, supports=_tiled_supports,
                     description="the dots as a tiled product (256 tokens per block share each staged hc_fn chunk, "
                                 "split-K partial sums), then per 4 tokens the ordered sum, finish and x_in: two "
                                 "launches; the rule's pick from B bucket 256"))
    register(Variant(POST_OP, "reference", "numpy", reference_post_variant,
                     description="numpy, float64, rounded once to X's dtype"))
    register(Variant(POST_OP, "naive", "cuda", _post_naive,
                     description="one thread per 4 channels of the four streams, blocks over (token, channel run); "
                                 "pure streaming"))
