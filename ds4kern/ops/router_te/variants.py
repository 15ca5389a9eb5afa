"""The router_te ops' variants (CUDA kernels in ``cuda_src/router_te/``) and their registration."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.arrays import dtype_name
from ...core.hookspecs import hookimpl
from ...core.registry import Variant
from ..router.api import IDX_KIND, SCORE_FUNCTIONS
from . import kernels as K
from . import reference as ref
from .api import BACKWARD_OP, DENSE_OP, BackwardArgs, DenseArgs, DenseProblem
from .aux import AUX_LOSS_BACKWARD_OP, AUX_LOSS_OP, AUX_SCORES_BACKWARD_OP, AUX_SCORES_OP, AuxArgs, AuxProblem


def _dense_supports(p: DenseProblem) -> Optional[str]:
    if p.num_experts > K.DENSE_MAX_E:
        return f"E={p.num_experts} exceeds {K.DENSE_MAX_E}, the most one warp holds in registers"
    if p.num_groups and (p.num_experts > 1024 or p.num_groups > 32):
        return "group-limited routing needs E <= 1024 and num_groups <= 32 in this kernel"
    return None


def _dense_naive(a: DenseArgs) -> None:
    T, E = a.logits.shape
    k, p = a.topk, a.problem
    vpl = next(v for v in K.NAIVE_VPL if 32 * v >= E)
    cw = a.frame.empty((T, k), np.float32)
    if p.output.startswith("indices"):
        idx, kind, out_map = a.routing, IDX_KIND[dtype_name(a.routing.dtype)], np.uint64(0)
        map_kind = 0
    else:
        idx, kind = a.frame.empty((T, k), np.int32), IDX_KIND["int32"]
        out_map, map_kind = a.routing, K.MAP_KIND[p.output]
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)
    kern = K.DENSE.kernel(K.dense_name(p.dtype, vpl))
    kern(((T + K.TE_WARPS - 1) // K.TE_WARPS,), (32 * K.TE_WARPS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(k), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor), cw, idx, np.int32(kind),
          np.int64(idx.strides[0] // idx.itemsize), np.int64(idx.strides[1] // idx.itemsize),
          a.probs, a.intermediate, out_map, np.int32(map_kind), np.int32(p.num_groups), np.int32(p.group_topk)))


def _backward_naive(a: BackwardArgs) -> None:
    T, E = a.grad_probs.shape
    p = a.problem
    r = a.routing
    if p.source == "indices":
        kind, i_rs, i_cs = IDX_KIND[dtype_name(r.dtype)], r.strides[0] // r.itemsize, r.strides[1] // r.itemsize
        if not a.use_pre_softmax:
            # a segment of lanes per token (several rows per warp), rows zero-filled by the warp
            seg = K.backward_idx_seg(p.dtype, a.topk)
            kern = K.BACKWARD.kernel(K.backward_idx_name(p.dtype, seg))
            per_block = 32 // seg * K.TE_WARPS
            vec = (E * a.grad_logits.itemsize) % 16 == 0 and a.grad_logits.data.ptr % 16 == 0
            kern(((T + per_block - 1) // per_block,), (32 * K.TE_WARPS,),
                 (a.grad_probs, a.intermediate, r, np.int32(kind), np.int64(i_rs), np.int64(i_cs), np.int64(T),
                  np.int32(E), np.int32(a.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
                  np.float32(a.scaling_factor), np.int32(vec), a.grad_logits))
            return
    else:
        kind, i_rs, i_cs = 0, 0, 0
    # 4 experts per lane access when every row starts 16-byte aligned (E % 4 == 0, aligned bases)
    vec = 4 if E % 4 == 0 and all(x.data.ptr % 16 == 0 for x in (a.grad_probs, a.intermediate, a.grad_logits)) \
        and (p.source == "indices" or r.data.ptr % 4 == 0) else 1
    kern = K.BACKWARD.kernel(K.backward_name(p.dtype, vec))
    kern(((T + K.TE_WARPS - 1) // K.TE_WARPS,), (32 * K.TE_WARPS,),
         (a.grad_probs, a.intermediate, r, np.int32(K.MAP_KIND[p.source]), np.int32(kind), np.int64(i_rs),
          np.int64(i_cs), np.int64(T), np.int32(E), np.int32(a.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor), a.grad_logits))


def _aux_scores_supports(p: AuxProblem) -> Optional[str]:
    if p.num_experts > 32 * K.AUX_VPL[-1]:
        return f"E={p.num_experts} exceeds {32 * K.AUX_VPL[-1]} in this kernel"
    return None


def _aux_scores_naive(a: AuxArgs) -> None:
    x = a.arrays["logits"]
    T, E = x.shape
    vpl = next(v for v in K.AUX_VPL if 32 * v >= E)
    kern = K.AUX.kernel(K.aux_scores_name(a.problem.dtype, vpl))
    scores, mask, inter = a.out
    kern(((T + K.TE_WARPS - 1) // K.TE_WARPS,), (32 * K.TE_WARPS,),
         (x, np.int64(T), np.int32(E), np.int32(a.params["topk"]), np.int32(SCORE_FUNCTIONS[a.params["score_function"]]),
          scores, mask, inter))


def _aux_scores_backward_naive(a: AuxArgs) -> None:
    g, inter = a.arrays["grad"], a.arrays["inter"]
    T, E = g.shape
    vec = 4 if E % 4 == 0 and all(v.data.ptr % 16 == 0 for v in (g, inter, a.out)) else 1
    kern = K.BACKWARD.kernel(K.backward_name(a.problem.dtype, vec))
    # the dense backward with every expert selected; k = 2 keeps the normalisation on (E = 1 too)
    kern(((T + K.TE_WARPS - 1) // K.TE_WARPS,), (32 * K.TE_WARPS,),
         (g, inter, np.uint64(0), np.int32(4), np.int32(0), np.int64(0), np.int64(0), np.int64(T), np.int32(E),
          np.int32(2), np.int32(SCORE_FUNCTIONS[a.params["score_function"]]), np.int32(0), np.float32(1.0), a.out))


def _aux_loss_cupy(a: AuxArgs) -> None:
    cp = a.frame.cp
    col = a.arrays["probs"].astype(cp.float32, copy=False).sum(axis=0, dtype=cp.float32)
    total = (col * a.arrays["tpe"].astype(cp.float32, copy=False)).sum(dtype=cp.float32)
    cp.multiply(total, a.params["c"], out=a.out)


def _aux_loss_backward_cupy(a: AuxArgs) -> None:
    cp = a.frame.cp
    gl = a.arrays["grad_loss"]
    g = gl.reshape(()).astype(cp.float32) if isinstance(gl, cp.ndarray) else cp.float32(gl)
    row = a.arrays["tpe"].astype(cp.float32) * a.params["c"] * g
    a.out[...] = cp.broadcast_to(row, a.out.shape).astype(a.out.dtype)


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(DENSE_OP, "reference", "numpy", ref.reference_dense,
                     description="numpy; dense probs, routing map or indices, intermediate"))
    register(Variant(DENSE_OP, "naive", "cuda", _dense_naive, supports=_dense_supports,
                     description="one warp per token: the naive selection, then the dense rows (one launch)"))
    register(Variant(BACKWARD_OP, "reference", "numpy", ref.reference_backward,
                     description="numpy; from a bytemap, bitmap or dense indices"))
    register(Variant(BACKWARD_OP, "naive", "cuda", _backward_naive,
                     description="one warp per token, two passes over the row; dense indices: 16 or 32 lanes per "
                                 "token (k gathers, rows zero-filled; softmax pre: one warp per token)"))
    register(Variant(AUX_SCORES_OP, "reference", "numpy", ref.reference_aux_scores, description="numpy"))
    register(Variant(AUX_SCORES_OP, "naive", "cuda", _aux_scores_naive, supports=_aux_scores_supports,
                     description="one warp per token: normalised scores, top-k map by warp arg-max rounds"))
    register(Variant(AUX_SCORES_BACKWARD_OP, "reference", "numpy", ref.reference_aux_scores_backward,
                     description="numpy"))
    register(Variant(AUX_SCORES_BACKWARD_OP, "naive", "cuda", _aux_scores_backward_naive,
                     description="the dense backward kernel with every expert selected"))
    register(Variant(AUX_LOSS_OP, "reference", "numpy", ref.reference_aux_loss,
                     description="numpy, fixed summation order"))
    register(Variant(AUX_LOSS_OP, "naive", "cuda", _aux_loss_cupy,
                     description="CuPy reductions: column sums, then the dot product (fixed order, no atomics)"))
    register(Variant(AUX_LOSS_BACKWARD_OP, "reference", "numpy", ref.reference_aux_loss_backward,
                     description="numpy"))
    register(Variant(AUX_LOSS_BACKWARD_OP, "naive", "cuda", _aux_loss_backward_cupy,
                     description="CuPy broadcast of tokens_per_expert * c * grad_loss"))
