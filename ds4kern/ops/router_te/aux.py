"""TE-parity aux-loss ops: scores for the load-balancing loss, the loss, and their backward."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import int_arg, is_number, number_arg
from ...core.arrays import Frame, dtype_name
from ...core.op import Call, define_op, reference_or
from ..router import api as _r
from . import kernels
from .api import _check_topk


AUX_SCORES_OP = "router_aux_scores"
AUX_SCORES_BACKWARD_OP = "router_aux_scores_backward"
AUX_LOSS_OP = "router_aux_loss"
AUX_LOSS_BACKWARD_OP = "router_aux_loss_backward"


@dataclass(frozen=True)
class AuxProblem:
    op: str
    backend: str
    tokens_bucket: int
    num_experts: int
    dtype: str
    detail: tuple = ()

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.num_experts, self.dtype) + self.detail


@dataclass
class AuxArgs:
    """Validated host/device arrays and parameters of an aux-loss op; ``out`` is filled."""

    arrays: dict
    params: dict
    out: Any
    problem: AuxProblem
    frame: Frame


def _aux_scores_prepare(logits, topk, score_function, allocate=True):
    frame, x, E = _r._logits(logits)
    topk = _check_topk(topk, E)
    sf = _r._score_function(score_function)
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    problem = AuxProblem(AUX_SCORES_OP, frame.backend, _r.bucket_tokens(T), E, dtype_name(x.dtype), (topk, sf))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), ()
    outs = (frame.empty(lead + (E,), np.float32), frame.empty(lead + (E,), np.bool_),
            frame.empty(lead + (E,), np.float32))
    args = AuxArgs({"logits": frame.xp.ascontiguousarray(x).reshape(T, E)}, {"topk": topk, "score_function": sf},
                   tuple(o.reshape(T, E) for o in outs), problem, frame)
    return args, outs


@define_op(AUX_SCORES_OP, rule=reference_or("naive"), kernels=(kernels.AUX,))
def router_aux_scores(logits, topk: int, *, score_function: str = "softmax", plan_only: bool = False):
    """Scores for the auxiliary load-balancing loss (no bias, no groups).

    scores = softmax(x) over E, or s / (sum_E s + 1e-20) for sigmoid / sqrtsoftplus; the routing
    map marks the top-k of those scores (larger first, lower index on ties).  Returns
    ``(scores float32 [..., E], routing_map bool [..., E], intermediate float32 [..., E])``; the
    intermediate (softmax: the scores; sigmoid: s; sqrtsoftplus: the raw logits) feeds
    :func:`router_aux_scores_backward`.
    """
    args, outs = _aux_scores_prepare(logits, topk, score_function, allocate=not plan_only)
    if plan_only:
        return Call(args.problem)
    return Call(args.problem, args, args.frame, outs, skip=math.prod(outs[0].shape[:-1]) == 0)






def _aux_scores_backward_prepare(grad_scores, intermediate, score_function, allocate=True):
    frame, g, E = _r._logits(grad_scores, "grad_scores")
    inter = frame.convert(intermediate, "intermediate")
    if tuple(inter.shape) != tuple(g.shape) or inter.dtype != np.float32:
        raise ValueError(f"intermediate must be float32 of shape {tuple(g.shape)}, got {dtype_name(inter.dtype)} "
                         f"{tuple(inter.shape)}")
    sf = _r._score_function(score_function)
    T = math.prod(g.shape[:-1])
    problem = AuxProblem(AUX_SCORES_BACKWARD_OP, frame.backend, _r.bucket_tokens(T), E, dtype_name(g.dtype), (sf,))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), None
    out = frame.empty(tuple(g.shape), g.dtype)
    xp = frame.xp
    arrays = {"grad": xp.ascontiguousarray(g).reshape(T, E), "inter": xp.ascontiguousarray(inter).reshape(T, E)}
    return AuxArgs(arrays, {"score_function": sf}, out.reshape(T, E), problem, frame), out


@define_op(AUX_SCORES_BACKWARD_OP, rule=reference_or("naive"), kernels=(kernels.BACKWARD,))
def router_aux_scores_backward(grad_scores, intermediate, *, score_function: str = "softmax",
                               plan_only: bool = False):
    """Gradient of :func:`router_aux_scores`' scores with respect to the logits."""
    args, out = _aux_scores_backward_prepare(grad_scores, intermediate, score_function, allocate=not plan_only)
    if plan_only:
        return Call(args.problem)
    return Call(args.problem, args, args.frame, out, skip=out.size == 0)




def _non_negative_counts(tpe) -> None:
    """Host ``tokens_per_expert``: counts, so no entry may be negative (or NaN)."""
    bad = ~(tpe >= 0)
    if bad.any():
        e = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(f"tokens_per_expert must be counts >= 0, found {tpe.ravel()[e]!r} for expert {e}")


def _aux_loss_prepare(op, probs_like, tokens_per_expert, topk, coeff, num_tokens, grad_loss, allocate=True):
    name = "probs" if op == AUX_LOSS_OP else "probs_like"
    frame, p, E = _r._logits(probs_like, name)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape [T, E], got {tuple(p.shape)}")
    tpe = frame.convert(tokens_per_expert, "tokens_per_expert")
    if tuple(tpe.shape) != (E,) or tpe.dtype.kind not in "iuf":
        raise ValueError(f"tokens_per_expert must be a numeric array of shape ({E},), got "
                         f"{dtype_name(tpe.dtype)} {tuple(tpe.shape)}")
    topk = _check_topk(topk, E)
    coeff = number_arg("coeff", coeff)
    if num_tokens is None and p.shape[0] == 0:
        raise ValueError(f"{name} has no rows, so the loss has no token count T: pass num_tokens")
    T = int_arg("num_tokens", int(p.shape[0]) if num_tokens is None else num_tokens, lo=1)
    if frame.backend == "numpy":  # (on the GPU, a check would cost a host synchronisation)
        _non_negative_counts(tpe)
    arrays = {"probs": p, "tpe": tpe}
    if op == AUX_LOSS_BACKWARD_OP:
        if is_number(grad_loss):
            arrays["grad_loss"] = np.float32(grad_loss)
        else:
            gl = frame.convert(grad_loss, "grad_loss")
            if gl.size != 1:
                raise ValueError(f"grad_loss must hold one value, got shape {tuple(gl.shape)}")
            arrays["grad_loss"] = gl
    problem = AuxProblem(op, frame.backend, _r.bucket_tokens(int(p.shape[0])), E, dtype_name(p.dtype))
    c = np.float32(E * coeff / (topk * float(T) ** 2))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), None
    out = frame.empty(() if op == AUX_LOSS_OP else tuple(p.shape), np.float32 if op == AUX_LOSS_OP else p.dtype)
    return AuxArgs(arrays, {"c": c}, out, problem, frame), out


@define_op(AUX_LOSS_OP, rule=reference_or("naive"))
def router_aux_loss(probs, tokens_per_expert, *, topk: int, coeff: float, num_tokens: Optional[int] = None,
                    plan_only: bool = False):
    """Load-balancing loss: sum_e (sum_t probs[t, e]) * tokens_per_expert[e] * E * coeff / (k * T^2).

    ``probs`` ``[T, E]``; ``tokens_per_expert`` ``[E]``, counts >= 0 (checked on host arrays; on the
    GPU a check would cost a host synchronisation); ``num_tokens`` (T) defaults to the rows of
    probs.  Returns a float32 array of shape ``()``.  The sums run in a fixed order
    (deterministic: no atomics).
    """
    args, out = _aux_loss_prepare(AUX_LOSS_OP, probs, tokens_per_expert, topk, coeff, num_tokens, None,
                                  allocate=not plan_only)
    return Call(args.problem) if plan_only else Call(args.problem, args, args.frame, out)




@define_op(AUX_LOSS_BACKWARD_OP, rule=reference_or("naive"))
def router_aux_loss_backward(grad_loss, probs_like, tokens_per_expert, *, topk: int, coeff: float,
                             num_tokens: Optional[int] = None, plan_only: bool = False):
    """grad[t, e] = E * coeff / (k * T^2) * tokens_per_expert[e] * grad_loss, shaped and typed like
    ``probs_like`` ``[T, E]`` (only its shape and dtype are used).  ``grad_loss``: a number or a
    one-element array."""
    args, out = _aux_loss_prepare(AUX_LOSS_BACKWARD_OP, probs_like, tokens_per_expert, topk, coeff, num_tokens,
                                  grad_loss, allocate=not plan_only)
    return Call(args.problem) if plan_only else Call(args.problem, args, args.frame, out)
