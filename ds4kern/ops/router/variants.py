"""router_topk's variants: how each launches, what each supports, and their registration.

A variant computes exactly what its ``supports`` accepts and never hands its call to another
variant; layout facts it depends on (alignment) are fields of :class:`RouterProblem`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.registry import Variant
from . import kernels as K
from .api import OP, SCORE_FUNCTIONS, IDX_KIND, RouterArgs, RouterProblem
from .reference import reference_router_topk


def _reference(a: RouterArgs) -> None:
    w, idx = reference_router_topk(a.logits, a.topk, a.score_function, a.use_pre_softmax, a.expert_bias,
                                   a.scaling_factor, a.num_groups, a.group_topk)
    a.weights[...] = w
    a.indices[...] = idx


def _naive_supports(p: RouterProblem) -> Optional[str]:
    if p.num_experts > K.NAIVE_MAX_E:
        return f"E={p.num_experts} exceeds {K.NAIVE_MAX_E}, the most one warp holds in registers"
    if p.num_groups and (p.num_experts > 1024 or p.num_groups > 32):
        return "group-limited routing needs E <= 1024 and num_groups <= 32 in this kernel"
    return None


def _threshold_supports(p: RouterProblem) -> Optional[str]:
    if p.num_experts > K.THRESHOLD_MAX_E:
        return f"E={p.num_experts} exceeds {K.THRESHOLD_MAX_E} (32 register slots per lane)"
    if p.num_groups:
        return "group-limited routing is not implemented in this variant"
    return None


def _warp_common(p: RouterProblem) -> Optional[str]:
    if p.num_experts > K.WARP_MAX_E:
        return f"E={p.num_experts} exceeds {K.WARP_MAX_E} (16 register slots per lane)"
    if p.topk > K.WARP_MAX_K:
        return f"k={p.topk} exceeds {K.WARP_MAX_K} (one candidate per lane)"
    return None


def _screened_supports(p: RouterProblem) -> Optional[str]:
    if p.num_groups:
        return "group-limited routing is the grouped variant's"
    return _warp_common(p)


def _grouped_supports(p: RouterProblem) -> Optional[str]:
    if not p.num_groups:
        return "needs group-limited routing (num_groups, group_topk)"
    why = _warp_common(p)
    if why:
        return why
    if p.num_groups > 32:
        return f"num_groups={p.num_groups} exceeds 32"
    if K.group_lanes(p.num_experts, p.num_groups) is None:
        return (f"groups of E/num_groups={p.num_experts // p.num_groups} experts do not fill a power-of-two "
                f"number of lanes of {K.warp_vpl(p.num_experts)} experts")
    return None


_SM_COUNT: dict = {}


def _sm_count(cp) -> int:
    dev = cp.cuda.Device().id
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = int(cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
    return _SM_COUNT[dev]


def _warp(a: RouterArgs) -> None:
    T, E = a.logits.shape
    p = a.problem
    vpl = K.warp_vpl(E)
    grouped = bool(p.num_groups)
    kern = K.WARP.kernel(K.warp_name(p.dtype, K.WARP_SF[(a.score_function, a.use_pre_softmax)], grouped, vpl))
    warps = K.WARP_THREADS // 32
    grid = min((T + warps - 1) // warps, K.WARP_BLOCKS_PER_SM * _sm_count(a.frame.xp))
    vec = int(p.aligned16 and (E * a.logits.itemsize) % 16 == 0 and E >= vpl)
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    direct = int(T <= K.WARP_DIRECT_MAX_TOKENS)  # (used where the keys are exact: groups, softmax)
    kern((grid,), (K.WARP_THREADS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.float32(a.scaling_factor),
          np.int32(vec)) + output_args(a) + (np.int32(a.num_groups), np.int32(a.group_topk), np.int32(direct)))


def _rows_supports(p: RouterProblem) -> Optional[str]:
    if not p.aligned16:
        return "the logits do not start on a 16-byte boundary (rows are read in 16-byte loads)"
    if p.score_function not in K.ROWS_SF or p.use_pre_softmax:
        return "only sigmoid and sqrtsoftplus scores (softmax needs the row's normaliser first)"
    if p.num_groups:
        E, G = p.num_experts, p.num_groups
        if E > K.ROWS_MAX_E or (E // G) % 16:
            return (f"group-limited routing needs E <= {K.ROWS_MAX_E} and groups of a multiple of 16 experts "
                    f"(E/num_groups={E // G}: whole chunks of 8 for both lanes of a token)")
        if p.group_topk > 7 and p.group_topk != G:
            return f"group-limited routing needs group_topk <= 7 or all groups kept (group_topk={p.group_topk})"
        if p.topk > K.ROWS_KMAX[0] or p.topk // p.group_topk > K.ROWS_GROUPED_MAX_M:
            return (f"group-limited routing needs k <= {K.ROWS_KMAX[0]} and k/group_topk <= {K.ROWS_GROUPED_MAX_M} "
                    f"(k={p.topk}, group_topk={p.group_topk})")
        return None
    if p.num_experts % 8 or p.num_experts > K.ROWS_MAX_E:
        return f"needs E a multiple of 8 and at most {K.ROWS_MAX_E} (chunks of 8 experts, 32-bit chunk masks)"
    if p.topk > K.ROWS_KMAX[-1]:
        return f"k={p.topk} exceeds {K.ROWS_KMAX[-1]} (the per-thread sorted list)"
    return None


def _rows(a: RouterArgs) -> None:
    T, E = a.logits.shape
    p = a.problem
    sf = K.ROWS_SF[a.score_function]
    if p.num_groups:  # two lanes per token, 8-entry list
        kmax, lpt = K.ROWS_KMAX[0], 2
        kern = K.ROWS_GROUPED.kernel(K.rows_grouped_name(p.dtype, sf))
        extra = (np.int32(a.num_groups), np.int32(a.group_topk))
    else:
        kmax = next(km for km in K.ROWS_KMAX if km >= a.topk)
        lpt = K.rows_lanes(E, kmax)
        kern = K.ROWS.kernel(K.rows_name(p.dtype, sf, kmax, lpt))
        extra = ()
    smem = K.rows_smem(kmax, grouped=bool(p.num_groups))
    tiles = (T + 32 // lpt - 1) // (32 // lpt)
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    kern(((tiles + K.ROWS_WARPS - 1) // K.ROWS_WARPS,), (32 * K.ROWS_WARPS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.float32(a.scaling_factor))
         + output_args(a) + extra, shared_mem=smem)


def _radix_supports(p: RouterProblem) -> Optional[str]:
    if p.num_groups:
        return "group-limited routing is not implemented in this variant"
    if K.radix_smem(p.num_experts, p.topk) > K.RADIX_MAX_SMEM:
        return (f"E={p.num_experts}, k={p.topk} need {K.radix_smem(p.num_experts, p.topk)} bytes of shared memory "
                f"(keys, histogram, selection); at most {K.RADIX_MAX_SMEM}")
    return None


def _radix(a: RouterArgs) -> None:
    T, E = a.logits.shape
    kern = K.RADIX.kernel(K.radix_name(a.problem.dtype))
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)
    kern((T,), (32,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor)) + output_args(a),
         shared_mem=K.radix_smem(E, a.topk))


def _naive(a: RouterArgs) -> None:
    _launch_rounds(a, K.NAIVE, K.NAIVE_VPL, K.naive_name, (np.int32(a.num_groups), np.int32(a.group_topk)))


def _threshold(a: RouterArgs) -> None:
    _launch_rounds(a, K.THRESHOLD, K.THRESHOLD_VPL, K.threshold_name, ())


def output_args(a) -> tuple:
    """Kernel arguments of the (possibly strided) outputs: weights, their row and column strides,
    indices, their strides (all in elements) and the index kind."""
    w, i = a.weights, a.indices
    return (w, np.int64(w.strides[0] // 4), np.int64(w.strides[1] // 4),
            i, np.int64(i.strides[0] // i.itemsize), np.int64(i.strides[1] // i.itemsize),
            np.int32(IDX_KIND[a.problem.index_dtype]))


def _launch_rounds(a: RouterArgs, family, vpls, name_of, extra: tuple) -> None:
    T, E = a.logits.shape
    vpl = next(v for v in vpls if 32 * v >= E)
    kern = family.kernel(name_of(a.problem.dtype, vpl))
    grid = (T + K.NAIVE_WARPS_PER_BLOCK - 1) // K.NAIVE_WARPS_PER_BLOCK
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    kern((grid,), (32 * K.NAIVE_WARPS_PER_BLOCK,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk),
          np.int32(SCORE_FUNCTIONS[a.score_function]), np.int32(a.use_pre_softmax),
          np.float32(a.scaling_factor)) + output_args(a) + extra)


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", _reference,
                     description="numpy, float32 arithmetic; the oracle of the GPU tests"))
    register(Variant(OP, "naive", "cuda", _naive, supports=_naive_supports,
                     description="one warp per token, k rounds of warp arg-max over register-held keys"))
    register(Variant(OP, "radix", "cuda", _radix, supports=_radix_supports,
                     description="one warp per token, keys in shared memory: radix select of the k-th key "
                                 "(4 passes of 8 bits), ties by index; E up to ~8k"))
    register(Variant(OP, "threshold", "cuda", _threshold, supports=_threshold_supports,
                     description="one warp per token; lane-max threshold, candidates selected exactly "
                                 "(fast screening for sqrtsoftplus)"))
    register(Variant(OP, "screened", "cuda", _warp, supports=_screened_supports,
                     description="one warp per token, compile-time score function, contiguous lanes with "
                                 "vector loads; screened threshold, candidates selected exactly (E <= 512, k <= 32)"))
    register(Variant(OP, "rows", "cuda", _rows, supports=_rows_supports,
                     description="one or two threads per token: chunk bounds, "
                                 "screened candidates, exact list (sigmoid/sqrtsoftplus, E <= 256, k <= 16; "
                                 "group-limited: groups of 16n experts, k <= 8, k/group_topk <= 2)"))
    register(Variant(OP, "grouped", "cuda", _warp, supports=_grouped_supports,
                     description="group-limited routing in one pass: each group's lanes find its top scores "
                                 "together, then group rounds and exact selection (E <= 512, k <= 32)"))
