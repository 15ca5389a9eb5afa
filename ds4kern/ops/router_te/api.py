"""Router in TransformerEngine's dense form, forward and backward (reference backend so far).

``router_topk_dense`` returns dense ``probs [..., E]`` (in the logits' dtype, zero except at the
selected experts, where they equal :func:`ds4kern.router_topk`'s weights), the selection as a
routing map (``bool [..., E]`` bytemap, or ``uint8 [..., ceil(E/8)]`` bitmap, bit e % 8 of byte
e // 8, least-significant bit first) or in a caller-given dense index buffer ``[..., k]``, and
the float32 intermediate that ``router_topk_backward`` needs:

- softmax, pre: the full softmax;  softmax, post: -inf except the selected experts' softmax;
- sigmoid: s = sigmoid(x);  sqrtsoftplus: the raw logits.

``router_topk_backward`` takes ``grad_probs`` and the intermediate and returns ``grad_logits``,
from either a routing map or dense indices (the same result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import bool_arg, int_arg
from ...core.arrays import Frame, dtype_name, rows_view
from ...core.op import Call, define_op, reference_or
from ..router import api as _r
from . import kernels

DENSE_OP = "router_topk_dense"
BACKWARD_OP = "router_topk_backward"
MAP_FORMATS = ("bytemap", "bitmap")
DENSE_INDEX_DTYPES = ("int16", "int32", "int64")

__all__ = ["router_topk_dense", "router_topk_backward", "DenseProblem", "DenseArgs", "BackwardProblem",
           "BackwardArgs"]


def _check_topk(topk, E: int) -> int:
    """``topk`` as an int in [1, E] (numpy ints too), or an error naming it."""
    return int_arg("topk", topk, lo=1, hi=E)






@dataclass(frozen=True)
class DenseProblem:
    backend: str
    tokens_bucket: int
    num_experts: int
    topk: int
    dtype: str
    score_function: str
    use_pre_softmax: bool
    has_bias: bool
    num_groups: int
    group_topk: int
    output: str  # "bytemap", "bitmap" or "indices:<dtype>"

    @property
    def bucket(self) -> tuple:
        return tuple(self.__dict__.values())[1:]


@dataclass
class DenseArgs:
    """``logits`` [T, E]; the variant fills ``probs`` [T, E] (logits dtype), ``intermediate``
    [T, E] float32 and ``routing`` ([T, E] bool, [T, ceil(E/8)] uint8, or [T, k] indices)."""

    logits: Any
    topk: int
    score_function: str
    use_pre_softmax: bool
    expert_bias: Any
    scaling_factor: float
    probs: Any
    intermediate: Any
    routing: Any
    problem: DenseProblem
    frame: Frame


@define_op(DENSE_OP, rule=reference_or("naive"), kernels=(kernels.DENSE,))
def router_topk_dense(logits, topk: int, *, score_function: str = "softmax", use_pre_softmax: bool = False,
                      expert_bias=None, scaling_factor: Optional[float] = None, num_groups: Optional[int] = None,
                      group_topk: Optional[int] = None, routing_map: str = "bytemap", topk_indices=None,
                      plan_only: bool = False):
    """Router forward in TE's dense form.

    Same selection and weights as :func:`ds4kern.router_topk` (same arguments).  With
    ``topk_indices`` (a caller-given ``[..., k]`` int16/int32/int64 buffer, filled in place) no
    routing map is made; otherwise ``routing_map`` picks ``"bytemap"`` or ``"bitmap"``.

    Returns ``(probs, routing, intermediate)``: probs ``[..., E]`` in the logits' dtype, the
    routing map or ``topk_indices``, and the float32 intermediate for the backward pass.
    """
    args, outs = _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor,
                          num_groups, group_topk, routing_map, topk_indices, allocate=not plan_only)
    if plan_only:
        return Call(args.problem)
    return Call(args.problem, args, args.frame, outs, skip=args.logits.shape[0] == 0)


def _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor, num_groups,
             group_topk, routing_map, topk_indices, allocate=True):
    # router_topk's validation: one place for every rule; its compact outputs are not allocated
    cargs = _r.router_topk.op.plan(logits, topk, score_function=score_function, use_pre_softmax=use_pre_softmax,
                                   expert_bias=expert_bias, scaling_factor=scaling_factor, num_groups=num_groups,
                                   group_topk=group_topk).args
    frame, p = cargs.frame, cargs.problem
    x = frame.array
    E, k = p.num_experts, p.topk
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    if topk_indices is not None:
        idx = frame.convert(topk_indices, "topk_indices", written=True)
        if dtype_name(idx.dtype) not in DENSE_INDEX_DTYPES:
            raise TypeError(f"topk_indices must be one of {DENSE_INDEX_DTYPES}, got {dtype_name(idx.dtype)}")
        if dtype_name(idx.dtype) == "int16" and E > 32768:
            raise ValueError(f"topk_indices of int16 hold expert ids up to 32767, but E={E}")
        output = f"indices:{dtype_name(idx.dtype)}"
    else:
        if routing_map not in MAP_FORMATS:
            raise ValueError(f"routing_map must be one of {MAP_FORMATS}, got {routing_map!r}")
        output = routing_map
    problem = DenseProblem(p.backend, p.tokens_bucket, E, k, p.dtype, p.score_function, p.use_pre_softmax,
                           p.has_bias, p.num_groups, p.group_topk, output)
    if not allocate:
        return DenseArgs(None, k, p.score_function, p.use_pre_softmax, cargs.expert_bias, cargs.scaling_factor,
                         None, None, None, problem, frame), ()
    xp = frame.xp
    x2 = xp.ascontiguousarray(x).reshape(T, E)
    probs = frame.empty(lead + (E,), x.dtype)
    inter = frame.empty(lead + (E,), np.float32)
    if topk_indices is not None:
        routing = idx
        r2 = rows_view(xp, idx, lead, k, "topk_indices")
    elif routing_map == "bytemap":
        routing = frame.empty(lead + (E,), np.bool_)
        r2 = routing.reshape(T, E)
    else:
        routing = frame.empty(lead + ((E + 7) // 8,), np.uint8)
        r2 = routing.reshape(T, (E + 7) // 8)
    args = DenseArgs(x2, k, p.score_function, p.use_pre_softmax, cargs.expert_bias, cargs.scaling_factor,
                     probs.reshape(T, E), inter.reshape(T, E), r2, problem, frame)
    return args, (probs, routing, inter)




# ---------------------------------------------------------------------------------------
# backward

@dataclass(frozen=True)
class BackwardProblem:
    backend: str
    tokens_bucket: int
    num_experts: int
    topk: int
    dtype: str
    score_function: str
    use_pre_softmax: bool
    source: str  # "bytemap", "bitmap" or "indices"

    @property
    def bucket(self) -> tuple:
        return tuple(self.__dict__.values())[1:]


@dataclass
class BackwardArgs:
    """``grad_probs`` and ``intermediate`` [T, E]; ``routing`` ([T, E] bool, [T, ceil(E/8)]
    uint8 or [T, k] indices); the variant fills ``grad_logits`` [T, E]."""

    grad_probs: Any
    intermediate: Any
    routing: Any
    topk: int
    score_function: str
    use_pre_softmax: bool
    scaling_factor: float
    grad_logits: Any
    problem: BackwardProblem
    frame: Frame


@define_op(BACKWARD_OP, rule=reference_or("naive"), kernels=(kernels.BACKWARD,))
def router_topk_backward(grad_probs, intermediate, *, topk: int, routing_map=None, topk_indices=None,
                         score_function: str = "softmax", use_pre_softmax: bool = False,
                         scaling_factor: Optional[float] = None, plan_only: bool = False):
    """Gradient of :func:`router_topk_dense`'s probs with respect to the logits.

    Args:
        grad_probs: ``[..., E]`` gradient of the loss with respect to probs.
        intermediate: the float32 ``[..., E]`` intermediate from the forward pass.
        routing_map: the forward's bytemap (bool ``[..., E]``) or bitmap (uint8
            ``[..., ceil(E/8)]``); or instead
        topk_indices: the forward's dense indices ``[..., k]`` (only those k entries are
            gathered; the rest of the gradient is zero-filled).  Entries outside ``[0, E)``
            select nothing (no memory outside the rows is touched); a row's entries are
            assumed distinct, as the forward writes them.
        topk, score_function, use_pre_softmax, scaling_factor: as in the forward.

    Returns ``grad_logits`` ``[..., E]`` in ``grad_probs``' dtype.  The expert bias and the group
    limit only choose the experts; they carry no gradient.
    """
    args, out = _prepare_backward(grad_probs, intermediate, topk, routing_map, topk_indices, score_function,
                                  use_pre_softmax, scaling_factor, allocate=not plan_only)
    if plan_only:
        return Call(args.problem)
    return Call(args.problem, args, args.frame, out, skip=args.grad_probs.shape[0] == 0)


def _prepare_backward(grad_probs, intermediate, topk, routing_map, topk_indices, score_function, use_pre_softmax,
                      scaling_factor, allocate=True):
    frame, g, E = _r._logits(grad_probs, "grad_probs")
    inter = frame.convert(intermediate, "intermediate")
    if tuple(inter.shape) != tuple(g.shape):
        raise ValueError(f"intermediate must have the shape of grad_probs {tuple(g.shape)}, got {tuple(inter.shape)}")
    if inter.dtype != np.float32:
        raise TypeError(f"intermediate must be float32 (as the forward returns it), got {dtype_name(inter.dtype)}")
    topk = _check_topk(topk, E)
    sf = _r._score_function(score_function)
    use_pre_softmax = bool_arg("use_pre_softmax", use_pre_softmax)
    if use_pre_softmax and sf != "softmax":
        raise ValueError(f"use_pre_softmax=True applies to score_function='softmax' only, got {sf!r}")
    scale = _r._scaling(scaling_factor)
    lead = tuple(g.shape[:-1])
    T = math.prod(lead)
    if (routing_map is None) == (topk_indices is None):
        raise ValueError("give exactly one of routing_map and topk_indices")
    if topk_indices is not None:
        routing = frame.convert(topk_indices, "topk_indices")
        if dtype_name(routing.dtype) not in DENSE_INDEX_DTYPES or tuple(routing.shape) != lead + (topk,):
            raise ValueError(f"topk_indices must be int16/int32/int64 of shape {lead + (topk,)}, got "
                             f"{dtype_name(routing.dtype)} {tuple(routing.shape)}")
        source = "indices"
        r2 = rows_view(frame.xp, routing, lead, topk, "topk_indices")
    else:
        routing = frame.convert(routing_map, "routing_map")
        if routing.dtype == np.bool_ and tuple(routing.shape) == lead + (E,):
            source = "bytemap"
        elif routing.dtype == np.uint8 and tuple(routing.shape) == lead + ((E + 7) // 8,):
            source = "bitmap"
        else:
            raise ValueError(f"routing_map must be bool {lead + (E,)} or uint8 {lead + ((E + 7) // 8,)}, got "
                             f"{dtype_name(routing.dtype)} {tuple(routing.shape)}")
        r2 = frame.xp.ascontiguousarray(routing).reshape(T, routing.shape[-1])
    problem = BackwardProblem(frame.backend, _r.bucket_tokens(T), E, topk, dtype_name(g.dtype), sf,
                              bool(use_pre_softmax), source)
    if not allocate:
        return BackwardArgs(None, None, None, topk, sf, bool(use_pre_softmax), scale, None, problem, frame), None
    out = frame.empty(tuple(g.shape), g.dtype)
    xp = frame.xp
    args = BackwardArgs(xp.ascontiguousarray(g).reshape(T, E), xp.ascontiguousarray(inter).reshape(T, E), r2, topk,
                        sf, bool(use_pre_softmax), scale, out.reshape(T, E), problem, frame)
    return args, out
