"""router_hash's variants and their registration."""

from __future__ import annotations

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.registry import Variant
from ..router.api import SCORE_FUNCTIONS
from ..router.variants import output_args
from . import kernels
from .api import OP, RouterHashArgs
from .reference import reference_router_hash


def _reference(a: RouterHashArgs) -> None:
    w, idx = reference_router_hash(a.logits, a.tid2eid, a.token_ids, a.score_function, a.scaling_factor)
    a.weights[...] = w
    a.indices[...] = idx


def _naive_hash(a: RouterHashArgs) -> None:
    T, E = a.logits.shape
    kern = kernels.NAIVE.kernel(kernels.naive_name(a.problem.dtype))
    grid = (T + kernels.WARPS_PER_BLOCK - 1) // kernels.WARPS_PER_BLOCK
    kern((grid,), (32 * kernels.WARPS_PER_BLOCK,),
         (a.logits, a.tid2eid, np.int64(a.tid2eid.shape[0]), a.token_ids, np.int32(a.token_ids.dtype == np.int64),
          np.int64(T), np.int32(E), np.int32(a.problem.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.float32(a.scaling_factor)) + output_args(a)
         + (a.errors if a.errors is not None else np.uint64(0),))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", _reference,
                     description="numpy table lookup; validates ids and table entries"))
    register(Variant(OP, "naive", "cuda", _naive_hash,
                     description="one warp per token, one table entry per lane; bad entries counted, never dereferenced"))
