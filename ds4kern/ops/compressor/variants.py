"""The KV compressor's variants and their registration.

The static rule picks ``naive`` everywhere: it wins or ties at every batch size measured on an
H100 (bench/compressor/PERFORMANCE.md).  ``grouped`` (the seed's POOL_GROUP design) is kept for
autotune and explicit requests.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.env import env_int
from ...core.hookspecs import hookimpl
from ...core.registry import Variant
from . import kernels as K
from .api import DECODE_OP, PREFILL_OP, CompressArgs, CompressProblem
from .reference import reference_decode, reference_prefill


def _cuda_supports(p: CompressProblem) -> Optional[str]:
    if p.dim not in K.GPU_DIMS:
        return f"d={p.dim}: the CUDA kernels are built for d in {K.GPU_DIMS}"
    if (p.dtype, p.cache_dtype) not in K.IO:
        return f"kv {p.dtype} -> cache {p.cache_dtype} is not an instantiated pair"
    return None


def _null(x):
    return x if x is not None else np.uint64(0)


def _launch_decode(a: CompressArgs, pool_group: int = 1) -> None:
    B = a.kv.shape[0]
    if B == 0:
        return
    p = a.problem
    split = K.split(a.ratio, a.dim, pool_group)
    kern = K.DECODE.kernel(K.decode_name(p.dtype, p.cache_dtype, a.ratio, a.dim, pool_group))
    kern(((B + pool_group - 1) // pool_group,), (a.dim // 4 * split,),
         (a.kv, a.score, a.ape, a.norm_w, a.positions, np.int32(a.positions.dtype == np.int64),
          a.rope_cos, a.rope_sin, np.int64(a.rope_cos.shape[0]), a.kv_state, a.score_state, a.cache,
          np.int64(a.cache.shape[1]), np.int64(B), np.float32(a.eps), _null(a.errors)))


def _naive_decode(a: CompressArgs) -> None:
    _launch_decode(a, 1)


def _grouped_decode(a: CompressArgs, pool_group: int = 2) -> None:
    if pool_group not in K.pool_groups(a.ratio):
        raise ValueError(f"pool_group must be one of {K.pool_groups(a.ratio)} for ratio {a.ratio}, got {pool_group!r}")
    _launch_decode(a, pool_group)


def _grouped_configs(p: CompressProblem) -> list:
    groups = K.pool_groups(p.ratio)
    first = env_int("DS4KERN_POOL_GROUP", 2, choices=groups)
    return [{"pool_group": first}] + [{"pool_group": g} for g in groups if g != first]


def _grouped_supports(p: CompressProblem) -> Optional[str]:
    r = _cuda_supports(p)
    if r is None and p.batch_bucket < 2:
        return "a single batch row: nothing to group"
    return r


def _prefill_naive(a: CompressArgs) -> None:
    B, S = a.kv.shape[:2]
    if B == 0 or S == 0:
        return
    if B > 65535:
        raise ValueError(f"compress_prefill on the GPU takes at most 65535 batch rows per call, got {B}")
    p = a.problem
    kind, starts = (0, np.uint64(0)) if a.positions is None else (1 + (a.positions.dtype == np.int64), a.positions)
    split = K.split(a.ratio, a.dim, 1)
    emit = K.PREFILL.kernel(K.emit_name(p.dtype, p.cache_dtype, a.ratio, a.dim))
    emit((S // a.ratio + 1, B), (a.dim // 4 * split,),
         (a.kv, a.score, np.int64(S), a.ape, a.norm_w, starts, np.int32(kind), np.int64(a.start),
          a.rope_cos, a.rope_sin, np.int64(a.rope_cos.shape[0]), a.kv_state, a.score_state, a.cache,
          np.int64(a.cache.shape[1]), np.float32(a.eps)))
    state = K.PREFILL.kernel(K.state_name(p.dtype, a.ratio, a.dim))
    state((B,), (256,),
          (a.kv, a.score, np.int64(S), a.ape, starts, np.int32(kind), np.int64(a.start),
           np.int64(a.rope_cos.shape[0]), a.kv_state, a.score_state, np.int64(a.cache.shape[1]), _null(a.errors)))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(DECODE_OP, "reference", "numpy", reference_decode,
                     description="numpy; float32 state, float64 pool/RMSNorm/RoPE; the oracle of the GPU tests"))
    register(Variant(DECODE_OP, "naive", "cuda", _naive_decode, supports=_cuda_supports,
                     description="one block per batch row; online softmax pool, RMSNorm, RoPE in one launch"))
    register(Variant(DECODE_OP, "grouped", "cuda", _grouped_decode, supports=_grouped_supports,
                     configs=_grouped_configs, autotune_only=True,
                     description="pool_group (2/4/8) batch rows per block, each with its own accumulators"))
    register(Variant(PREFILL_OP, "reference", "numpy", reference_prefill,
                     description="numpy; token by token through the reference decode step"))
    register(Variant(PREFILL_OP, "naive", "cuda", _prefill_naive, supports=_cuda_supports,
                     description="one block per completed window, then one per batch row for the state"))
