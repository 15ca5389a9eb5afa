"""Router in TransformerEngine's dense form, forward and backward (reference backend so far).

``router_topk_dense`` returns dense ``probs [..., E]`` (in the logits' dtype, zero except at the
selected experts, where they equal :func:`ds4kern.router_topk`'s weights), the selection as a
routing map (``bool [..., E]`` bytemap, or ``uint8 [..., ceil(E/8)]`` bitmap, bit e % 8 of byte
e // 8, least-significant bit first) or in a caller-given dense index buffer ``[..., k]``, and
the float32 intermediate that ``router_topk_backward`` needs:

- softmax, pre: the full softmax;  softmax, post: -inf except the selected experts' softmax;
- sigmoid: s = sigmoid(x);  sqrtsoftplus: the raw logits.

``router_topk_backward`` takes ``grad_probs`` and the intermediate and returns ``grad_logits``,
from either a routing map or dense indices (the same result).  Only the reference (numpy)
variants exist so far; CUDA variants are future work (the dispatcher says so for GPU arrays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import dispatch
from .._arrays import Frame, dtype_name
from ..hookspecs import hookimpl
from ..registry import Variant
from . import router as _r

DENSE_OP = "router_topk_dense"
BACKWARD_OP = "router_topk_backward"
MAP_FORMATS = ("bytemap", "bitmap")
DENSE_INDEX_DTYPES = ("int16", "int32", "int64")

__all__ = ["router_topk_dense", "router_topk_backward", "router_aux_scores", "router_aux_scores_backward",
           "router_aux_loss", "router_aux_loss_backward", "pack_bitmap", "unpack_bitmap"]


def _check_topk(topk, E: int) -> None:
    if type(topk) is not int or not 1 <= topk <= E:
        raise ValueError(f"topk must be an int with 1 <= topk <= E={E}, got {topk!r}")


def pack_bitmap(mask: np.ndarray) -> np.ndarray:
    """bool ``[..., E]`` -> uint8 ``[..., ceil(E/8)]``, bit e % 8 of byte e // 8 (LSB first)."""
    return np.packbits(np.asarray(mask, bool), axis=-1, bitorder="little")


def unpack_bitmap(bits: np.ndarray, num_experts: int) -> np.ndarray:
    """uint8 ``[..., ceil(E/8)]`` -> bool ``[..., E]``."""
    return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=num_experts, bitorder="little").astype(bool)


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


def router_topk_dense(logits, topk: int, *, score_function: str = "softmax", use_pre_softmax: bool = False,
                      expert_bias=None, scaling_factor: Optional[float] = None, num_groups: Optional[int] = None,
                      group_topk: Optional[int] = None, routing_map: str = "bytemap", topk_indices=None,
                      variant: Optional[str] = None):
    """Router forward in TE's dense form.

    Same selection and weights as :func:`ds4kern.router_topk` (same arguments).  With
    ``topk_indices`` (a caller-given ``[..., k]`` int16/int32/int64 buffer, filled in place) no
    routing map is made; otherwise ``routing_map`` picks ``"bytemap"`` or ``"bitmap"``.

    Returns ``(probs, routing, intermediate)``: probs ``[..., E]`` in the logits' dtype, the
    routing map or ``topk_indices``, and the float32 intermediate for the backward pass.
    """
    args, outs = _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor,
                          num_groups, group_topk, routing_map, topk_indices)
    v = dispatch.select(DENSE_OP, args.problem, variant)
    if args.logits.shape[0] > 0:
        args.frame.run(v.fn, args)
    return tuple(args.frame.give_back(o) for o in outs)


def _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor, num_groups,
             group_topk, routing_map, topk_indices, allocate=True):
    # router_topk's validation: one place for every rule; its compact outputs are not allocated
    cargs, _ = _r._prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor,
                           None, None, num_groups, group_topk, allocate=False)
    frame, p = cargs.frame, cargs.problem
    x = frame.array
    E, k = p.num_experts, p.topk
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    if topk_indices is not None:
        idx = frame.convert(topk_indices, "topk_indices")
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
        r2 = _r.rows_view(xp, idx, lead, k, "topk_indices")
    elif routing_map == "bytemap":
        routing = frame.empty(lead + (E,), np.bool_)
        r2 = routing.reshape(T, E)
    else:
        routing = frame.empty(lead + ((E + 7) // 8,), np.uint8)
        r2 = routing.reshape(T, (E + 7) // 8)
    args = DenseArgs(x2, k, p.score_function, p.use_pre_softmax, cargs.expert_bias, cargs.scaling_factor,
                     probs.reshape(T, E), inter.reshape(T, E), r2, problem, frame)
    return args, (probs, routing, inter)


def _reference_dense(a: DenseArgs) -> None:
    p = a.problem
    x = np.asarray(a.logits).astype(np.float32)
    w, idx = _r.reference_router_topk(x, a.topk, a.score_function, a.use_pre_softmax, a.expert_bias,
                                      a.scaling_factor, p.num_groups, p.group_topk)
    T, E = x.shape
    dense = np.zeros((T, E), np.float32)
    np.put_along_axis(dense, idx, w, axis=1)
    a.probs[...] = dense.astype(a.probs.dtype)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if a.score_function == "softmax" and a.use_pre_softmax:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            inter = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
        elif a.score_function == "softmax":
            inter = np.full((T, E), -np.inf, np.float32)
            xs = np.take_along_axis(x, idx, axis=1)
            v = np.exp(xs - xs[:, :1])
            np.put_along_axis(inter, idx, v / v.sum(axis=1, keepdims=True, dtype=np.float32), axis=1)
        elif a.score_function == "sigmoid":
            inter = _r.score(x, "sigmoid")
        else:
            inter = x
    a.intermediate[...] = inter
    if p.output.startswith("indices"):
        a.routing[...] = idx
    else:
        mask = np.zeros((T, E), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        a.routing[...] = mask if p.output == "bytemap" else pack_bitmap(mask)


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


def router_topk_backward(grad_probs, intermediate, *, topk: int, routing_map=None, topk_indices=None,
                         score_function: str = "softmax", use_pre_softmax: bool = False,
                         scaling_factor: Optional[float] = None, variant: Optional[str] = None):
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
                                  use_pre_softmax, scaling_factor)
    v = dispatch.select(BACKWARD_OP, args.problem, variant)
    if args.grad_probs.shape[0] > 0:
        args.frame.run(v.fn, args)
    return args.frame.give_back(out)


def _prepare_backward(grad_probs, intermediate, topk, routing_map, topk_indices, score_function, use_pre_softmax,
                      scaling_factor, allocate=True):
    frame, g, E = _r._logits(grad_probs, "grad_probs")
    inter = frame.convert(intermediate, "intermediate")
    if tuple(inter.shape) != tuple(g.shape):
        raise ValueError(f"intermediate must have the shape of grad_probs {tuple(g.shape)}, got {tuple(inter.shape)}")
    if inter.dtype != np.float32:
        raise TypeError(f"intermediate must be float32 (as the forward returns it), got {dtype_name(inter.dtype)}")
    _check_topk(topk, E)
    sf = _r._score_function(score_function)
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
        r2 = _r.rows_view(frame.xp, routing, lead, topk, "topk_indices")
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
    problem = BackwardProblem(frame.backend, _r._bucket_tokens(T), E, topk, dtype_name(g.dtype), sf,
                              bool(use_pre_softmax), source)
    if not allocate:
        return BackwardArgs(None, None, None, topk, sf, bool(use_pre_softmax), scale, None, problem, frame), None
    out = frame.empty(tuple(g.shape), g.dtype)
    xp = frame.xp
    args = BackwardArgs(xp.ascontiguousarray(g).reshape(T, E), xp.ascontiguousarray(inter).reshape(T, E), r2, topk,
                        sf, bool(use_pre_softmax), scale, out.reshape(T, E), problem, frame)
    return args, out


def _reference_backward(a: BackwardArgs) -> None:
    T, E = a.grad_probs.shape
    g = np.asarray(a.grad_probs).astype(np.float32) * np.float32(a.scaling_factor)
    act = np.asarray(a.intermediate, np.float32)
    if a.problem.source == "indices":
        mask = np.zeros((T, E), bool)
        ids = np.asarray(a.routing).astype(np.int64)
        ok = (ids >= 0) & (ids < E)  # entries outside [0, E) select nothing
        mask[np.nonzero(ok)[0], ids[ok]] = True
    elif a.problem.source == "bitmap":
        mask = unpack_bitmap(a.routing, E)
    else:
        mask = np.asarray(a.routing, bool)
    eps = np.float32(1e-20)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if a.score_function == "softmax":
            a_sel = np.where(mask, act, np.float32(0))
            gm = np.where(mask, g, np.float32(0))
            dot = (gm * a_sel).sum(axis=1, keepdims=True, dtype=np.float32)
            if a.use_pre_softmax:
                gx = act * (gm - dot)
            else:
                gx = np.where(mask, a_sel * (g - dot), np.float32(0))
        else:
            s = act if a.score_function == "sigmoid" else _r.score(act, "sqrtsoftplus")
            if a.topk > 1:
                s_sel = np.where(mask, s, np.float32(0))
                S = s_sel.sum(axis=1, keepdims=True, dtype=np.float32) + eps
                D = (np.where(mask, g, np.float32(0)) * s_sel).sum(axis=1, keepdims=True, dtype=np.float32)
                gs = np.where(mask, g / S - D / (S * S), np.float32(0))
            else:
                gs = np.where(mask, g, np.float32(0))
            if a.score_function == "sigmoid":
                gx = gs * s * (np.float32(1) - s)
            else:
                x = act
                sig = np.float32(1) / (np.float32(1) + np.exp(-x))
                d = np.where(x > np.float32(20), np.float32(1), sig) / (np.float32(2) * s + eps)
                gx = gs * d
    a.grad_logits[...] = gx.astype(a.grad_logits.dtype)


def explain_dense(logits, topk, *, score_function="softmax", use_pre_softmax=False, expert_bias=None,
                  scaling_factor=None, num_groups=None, group_topk=None, routing_map="bytemap", topk_indices=None,
                  variant=None):
    args, _ = _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor, num_groups,
                       group_topk, routing_map, topk_indices, allocate=False)
    return dispatch.decide(DENSE_OP, args.problem, variant)


def explain_backward(grad_probs, intermediate, *, topk, routing_map=None, topk_indices=None,
                     score_function="softmax", use_pre_softmax=False, scaling_factor=None, variant=None):
    args, _ = _prepare_backward(grad_probs, intermediate, topk, routing_map, topk_indices, score_function,
                                use_pre_softmax, scaling_factor, allocate=False)
    return dispatch.decide(BACKWARD_OP, args.problem, variant)


# ---------------------------------------------------------------------------------------
# aux-loss ops (TE parity): scores for the load-balancing loss, and the loss itself

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


def _run_aux(op, args, variant):
    v = dispatch.select(op, args.problem, variant)
    args.frame.run(v.fn, args)


def _aux_scores_prepare(logits, topk, score_function, allocate=True):
    frame, x, E = _r._logits(logits)
    _check_topk(topk, E)
    sf = _r._score_function(score_function)
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    problem = AuxProblem(AUX_SCORES_OP, frame.backend, _r._bucket_tokens(T), E, dtype_name(x.dtype), (topk, sf))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), ()
    outs = (frame.empty(lead + (E,), np.float32), frame.empty(lead + (E,), np.bool_),
            frame.empty(lead + (E,), np.float32))
    args = AuxArgs({"logits": frame.xp.ascontiguousarray(x).reshape(T, E)}, {"topk": topk, "score_function": sf},
                   tuple(o.reshape(T, E) for o in outs), problem, frame)
    return args, outs


def router_aux_scores(logits, topk: int, *, score_function: str = "softmax", variant: Optional[str] = None):
    """Scores for the auxiliary load-balancing loss (no bias, no groups).

    scores = softmax(x) over E, or s / (sum_E s + 1e-20) for sigmoid / sqrtsoftplus; the routing
    map marks the top-k of those scores (larger first, lower index on ties).  Returns
    ``(scores float32 [..., E], routing_map bool [..., E], intermediate float32 [..., E])``; the
    intermediate (softmax: the scores; sigmoid: s; sqrtsoftplus: the raw logits) feeds
    :func:`router_aux_scores_backward`.
    """
    args, outs = _aux_scores_prepare(logits, topk, score_function)
    if math.prod(outs[0].shape[:-1]):
        _run_aux(AUX_SCORES_OP, args, variant)
    return tuple(args.frame.give_back(o) for o in outs)


def _aux_normalised(x, sf):
    with np.errstate(over="ignore", invalid="ignore"):
        if sf == "softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
            return p.astype(np.float32), p.astype(np.float32)
        s = _r.score(x, sf)
        p = s / (s.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
        return p.astype(np.float32), (s if sf == "sigmoid" else x)


def _reference_aux_scores(a: AuxArgs) -> None:
    x = np.asarray(a.arrays["logits"]).astype(np.float32)
    p, inter = _aux_normalised(x, a.params["score_function"])
    idx = _r.topk_by_key(p, a.params["topk"])
    mask = np.zeros(p.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    a.out[0][...] = p
    a.out[1][...] = mask
    a.out[2][...] = inter


def _aux_scores_backward_prepare(grad_scores, intermediate, score_function, allocate=True):
    frame, g, E = _r._logits(grad_scores, "grad_scores")
    inter = frame.convert(intermediate, "intermediate")
    if tuple(inter.shape) != tuple(g.shape) or inter.dtype != np.float32:
        raise ValueError(f"intermediate must be float32 of shape {tuple(g.shape)}, got {dtype_name(inter.dtype)} "
                         f"{tuple(inter.shape)}")
    sf = _r._score_function(score_function)
    T = math.prod(g.shape[:-1])
    problem = AuxProblem(AUX_SCORES_BACKWARD_OP, frame.backend, _r._bucket_tokens(T), E, dtype_name(g.dtype), (sf,))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), None
    out = frame.empty(tuple(g.shape), g.dtype)
    xp = frame.xp
    arrays = {"grad": xp.ascontiguousarray(g).reshape(T, E), "inter": xp.ascontiguousarray(inter).reshape(T, E)}
    return AuxArgs(arrays, {"score_function": sf}, out.reshape(T, E), problem, frame), out


def router_aux_scores_backward(grad_scores, intermediate, *, score_function: str = "softmax",
                               variant: Optional[str] = None):
    """Gradient of :func:`router_aux_scores`' scores with respect to the logits."""
    args, out = _aux_scores_backward_prepare(grad_scores, intermediate, score_function)
    if out.size:
        _run_aux(AUX_SCORES_BACKWARD_OP, args, variant)
    return args.frame.give_back(out)


def _reference_aux_scores_backward(a: AuxArgs) -> None:
    g = np.asarray(a.arrays["grad"]).astype(np.float32)
    act = np.asarray(a.arrays["inter"], np.float32)
    sf = a.params["score_function"]
    with np.errstate(over="ignore", invalid="ignore"):
        if sf == "softmax":
            gx = act * (g - (g * act).sum(axis=1, keepdims=True, dtype=np.float32))
        else:
            s = act if sf == "sigmoid" else _r.score(act, "sqrtsoftplus")
            S = s.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20)
            D = (g * s).sum(axis=1, keepdims=True, dtype=np.float32)
            gs = g / S - D / (S * S)
            if sf == "sigmoid":
                gx = gs * s * (np.float32(1) - s)
            else:
                sig = np.float32(1) / (np.float32(1) + np.exp(-act))
                gx = gs * np.where(act > np.float32(20), np.float32(1), sig) / (np.float32(2) * s + np.float32(1e-20))
    a.out[...] = gx.astype(a.out.dtype)


def _aux_loss_prepare(op, probs_like, tokens_per_expert, topk, coeff, num_tokens, grad_loss, allocate=True):
    name = "probs" if op == AUX_LOSS_OP else "probs_like"
    frame, p, E = _r._logits(probs_like, name)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape [T, E], got {tuple(p.shape)}")
    tpe = frame.convert(tokens_per_expert, "tokens_per_expert")
    if tuple(tpe.shape) != (E,) or tpe.dtype.kind not in "iuf":
        raise ValueError(f"tokens_per_expert must be a numeric array of shape ({E},), got "
                         f"{dtype_name(tpe.dtype)} {tuple(tpe.shape)}")
    _check_topk(topk, E)
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool) or not math.isfinite(coeff):
        raise ValueError(f"coeff must be a finite number, got {coeff!r}")
    T = int(p.shape[0]) if num_tokens is None else num_tokens
    if type(T) is not int or T < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    arrays = {"probs": p, "tpe": tpe}
    if op == AUX_LOSS_BACKWARD_OP:
        if isinstance(grad_loss, (int, float, np.floating, np.integer)) and not isinstance(grad_loss, bool):
            arrays["grad_loss"] = np.float32(grad_loss)
        else:
            gl = frame.convert(grad_loss, "grad_loss")
            if gl.size != 1:
                raise ValueError(f"grad_loss must hold one value, got shape {tuple(gl.shape)}")
            arrays["grad_loss"] = gl
    problem = AuxProblem(op, frame.backend, _r._bucket_tokens(int(p.shape[0])), E, dtype_name(p.dtype))
    c = np.float32(E * coeff / (topk * float(T) ** 2))
    if not allocate:
        return AuxArgs({}, {}, None, problem, frame), None
    out = frame.empty(() if op == AUX_LOSS_OP else tuple(p.shape), np.float32 if op == AUX_LOSS_OP else p.dtype)
    return AuxArgs(arrays, {"c": c}, out, problem, frame), out


def router_aux_loss(probs, tokens_per_expert, *, topk: int, coeff: float, num_tokens: Optional[int] = None,
                    variant: Optional[str] = None):
    """Load-balancing loss: sum_e (sum_t probs[t, e]) * tokens_per_expert[e] * E * coeff / (k * T^2).

    ``probs`` ``[T, E]``; ``tokens_per_expert`` ``[E]``; ``num_tokens`` (T) defaults to the rows of
    probs.  Returns a float32 array of shape ``()``.  The sums run in a fixed order
    (deterministic: no atomics).
    """
    args, out = _aux_loss_prepare(AUX_LOSS_OP, probs, tokens_per_expert, topk, coeff, num_tokens, None)
    _run_aux(AUX_LOSS_OP, args, variant)
    return args.frame.give_back(out)


def _reference_aux_loss(a: AuxArgs) -> None:
    col = np.asarray(a.arrays["probs"]).astype(np.float32).sum(axis=0, dtype=np.float32)
    tpe = np.asarray(a.arrays["tpe"]).astype(np.float32)
    a.out[...] = np.float32((col * tpe).sum(dtype=np.float32) * a.params["c"])


def router_aux_loss_backward(grad_loss, probs_like, tokens_per_expert, *, topk: int, coeff: float,
                             num_tokens: Optional[int] = None, variant: Optional[str] = None):
    """grad[t, e] = E * coeff / (k * T^2) * tokens_per_expert[e] * grad_loss, shaped and typed like
    ``probs_like`` ``[T, E]`` (only its shape and dtype are used).  ``grad_loss``: a number or a
    one-element array."""
    args, out = _aux_loss_prepare(AUX_LOSS_BACKWARD_OP, probs_like, tokens_per_expert, topk, coeff, num_tokens,
                                  grad_loss)
    _run_aux(AUX_LOSS_BACKWARD_OP, args, variant)
    return args.frame.give_back(out)


def _reference_aux_loss_backward(a: AuxArgs) -> None:
    g = np.float32(np.asarray(a.arrays["grad_loss"]).reshape(()))
    row = np.asarray(a.arrays["tpe"]).astype(np.float32) * a.params["c"] * g
    a.out[...] = np.broadcast_to(row, a.out.shape).astype(a.out.dtype)


def explain_aux_scores(logits, topk, *, score_function="softmax", variant=None):
    return dispatch.decide(AUX_SCORES_OP, _aux_scores_prepare(logits, topk, score_function, False)[0].problem, variant)


def explain_aux_scores_backward(grad_scores, intermediate, *, score_function="softmax", variant=None):
    args, _ = _aux_scores_backward_prepare(grad_scores, intermediate, score_function, False)
    return dispatch.decide(AUX_SCORES_BACKWARD_OP, args.problem, variant)


def explain_aux_loss(probs, tokens_per_expert, *, topk, coeff, num_tokens=None, variant=None):
    args, _ = _aux_loss_prepare(AUX_LOSS_OP, probs, tokens_per_expert, topk, coeff, num_tokens, None, False)
    return dispatch.decide(AUX_LOSS_OP, args.problem, variant)


def explain_aux_loss_backward(grad_loss, probs_like, tokens_per_expert, *, topk, coeff, num_tokens=None,
                              variant=None):
    args, _ = _aux_loss_prepare(AUX_LOSS_BACKWARD_OP, probs_like, tokens_per_expert, topk, coeff, num_tokens,
                                grad_loss, False)
    return dispatch.decide(AUX_LOSS_BACKWARD_OP, args.problem, variant)


# ---------------------------------------------------------------------------------------
# CUDA variants (kernels in router.cu)

MAP_KIND = {"bytemap": 1, "bitmap": 2, "indices": 3}
TE_WARPS = 4  # warps (tokens) per block, DS4_DENSE_WARPS in router.cu


def _dense_supports(p: DenseProblem) -> Optional[str]:
    if p.num_experts > _r.NAIVE_MAX_E:
        return f"E={p.num_experts} exceeds {_r.NAIVE_MAX_E}, the most one warp holds in registers"
    if p.num_groups and (p.num_experts > 1024 or p.num_groups > 32):
        return "group-limited routing needs E <= 1024 and num_groups <= 32 in this kernel"
    return None


def _dense_naive(a: DenseArgs) -> None:
    T, E = a.logits.shape
    k, p = a.topk, a.problem
    vpl = next(v for v in _r.NAIVE_VPL if 32 * v >= E)
    cw = a.frame.empty((T, k), np.float32)
    if p.output.startswith("indices"):
        idx, kind, out_map = a.routing, _r.IDX_KIND[dtype_name(a.routing.dtype)], np.uint64(0)
        map_kind = 0
    else:
        idx, kind = a.frame.empty((T, k), np.int32), _r.IDX_KIND["int32"]
        out_map, map_kind = a.routing, MAP_KIND[p.output]
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)
    kern = _r.ROUTER_KERNELS.kernel(_r.dense_name(p.dtype, vpl))
    kern(((T + TE_WARPS - 1) // TE_WARPS,), (32 * TE_WARPS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(k), np.int32(_r.SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor), cw, idx, np.int32(kind),
          np.int64(idx.strides[0] // idx.itemsize), np.int64(idx.strides[1] // idx.itemsize),
          a.probs, a.intermediate, out_map, np.int32(map_kind), np.int32(p.num_groups), np.int32(p.group_topk)))


def _backward_naive(a: BackwardArgs) -> None:
    T, E = a.grad_probs.shape
    p = a.problem
    r = a.routing
    if p.source == "indices":
        kind, i_rs, i_cs = _r.IDX_KIND[dtype_name(r.dtype)], r.strides[0] // r.itemsize, r.strides[1] // r.itemsize
        if not a.use_pre_softmax:
            # a segment of lanes per token (several rows per warp), rows zero-filled by the warp
            seg = _r.backward_idx_seg(p.dtype, a.topk)
            kern = _r.ROUTER_KERNELS.kernel(_r.backward_idx_name(p.dtype, seg))
            per_block = 32 // seg * TE_WARPS
            vec = (E * a.grad_logits.itemsize) % 16 == 0 and a.grad_logits.data.ptr % 16 == 0
            kern(((T + per_block - 1) // per_block,), (32 * TE_WARPS,),
                 (a.grad_probs, a.intermediate, r, np.int32(kind), np.int64(i_rs), np.int64(i_cs), np.int64(T),
                  np.int32(E), np.int32(a.topk), np.int32(_r.SCORE_FUNCTIONS[a.score_function]),
                  np.float32(a.scaling_factor), np.int32(vec), a.grad_logits))
            return
    else:
        kind, i_rs, i_cs = 0, 0, 0
    # 4 experts per lane access when every row starts 16-byte aligned (E % 4 == 0, aligned bases)
    vec = 4 if E % 4 == 0 and all(x.data.ptr % 16 == 0 for x in (a.grad_probs, a.intermediate, a.grad_logits)) \
        and (p.source == "indices" or r.data.ptr % 4 == 0) else 1
    kern = _r.ROUTER_KERNELS.kernel(_r.backward_name(p.dtype, vec))
    kern(((T + TE_WARPS - 1) // TE_WARPS,), (32 * TE_WARPS,),
         (a.grad_probs, a.intermediate, r, np.int32(MAP_KIND[p.source]), np.int32(kind), np.int64(i_rs),
          np.int64(i_cs), np.int64(T), np.int32(E), np.int32(a.topk), np.int32(_r.SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor), a.grad_logits))


def _aux_scores_supports(p: AuxProblem) -> Optional[str]:
    if p.num_experts > 32 * _r.AUX_VPL[-1]:
        return f"E={p.num_experts} exceeds {32 * _r.AUX_VPL[-1]} in this kernel"
    return None


def _aux_scores_naive(a: AuxArgs) -> None:
    x = a.arrays["logits"]
    T, E = x.shape
    vpl = next(v for v in _r.AUX_VPL if 32 * v >= E)
    kern = _r.ROUTER_KERNELS.kernel(_r.aux_scores_name(a.problem.dtype, vpl))
    scores, mask, inter = a.out
    kern(((T + TE_WARPS - 1) // TE_WARPS,), (32 * TE_WARPS,),
         (x, np.int64(T), np.int32(E), np.int32(a.params["topk"]), np.int32(_r.SCORE_FUNCTIONS[a.params["score_function"]]),
          scores, mask, inter))


def _aux_scores_backward_naive(a: AuxArgs) -> None:
    g, inter = a.arrays["grad"], a.arrays["inter"]
    T, E = g.shape
    vec = 4 if E % 4 == 0 and all(v.data.ptr % 16 == 0 for v in (g, inter, a.out)) else 1
    kern = _r.ROUTER_KERNELS.kernel(_r.backward_name(a.problem.dtype, vec))
    # the dense backward with every expert selected; k = 2 keeps the normalisation on (E = 1 too)
    kern(((T + TE_WARPS - 1) // TE_WARPS,), (32 * TE_WARPS,),
         (g, inter, np.uint64(0), np.int32(4), np.int32(0), np.int64(0), np.int64(0), np.int64(T), np.int32(E),
          np.int32(2), np.int32(_r.SCORE_FUNCTIONS[a.params["score_function"]]), np.int32(0), np.float32(1.0), a.out))


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
    register(Variant(DENSE_OP, "reference", "numpy", _reference_dense,
                     description="numpy; dense probs, routing map or indices, intermediate"))
    register(Variant(DENSE_OP, "naive", "cuda", _dense_naive, supports=_dense_supports, cost=1.0,
                     description="one warp per token: the naive selection, then the dense rows (one launch)"))
    register(Variant(BACKWARD_OP, "reference", "numpy", _reference_backward,
                     description="numpy; from a bytemap, bitmap or dense indices"))
    register(Variant(BACKWARD_OP, "naive", "cuda", _backward_naive, cost=1.0,
                     description="one warp per token, two passes over the row; dense indices: 16 or 32 lanes per "
                                 "token (k gathers, rows zero-filled; softmax pre: one warp per token)"))
    register(Variant(AUX_SCORES_OP, "reference", "numpy", _reference_aux_scores, description="numpy"))
    register(Variant(AUX_SCORES_OP, "naive", "cuda", _aux_scores_naive, supports=_aux_scores_supports,
                     description="one warp per token: normalised scores, top-k map by warp arg-max rounds"))
    register(Variant(AUX_SCORES_BACKWARD_OP, "reference", "numpy", _reference_aux_scores_backward,
                     description="numpy"))
    register(Variant(AUX_SCORES_BACKWARD_OP, "naive", "cuda", _aux_scores_backward_naive,
                     description="the dense backward kernel with every expert selected"))
    register(Variant(AUX_LOSS_OP, "reference", "numpy", _reference_aux_loss,
                     description="numpy, fixed summation order"))
    register(Variant(AUX_LOSS_OP, "naive", "cuda", _aux_loss_cupy,
                     description="CuPy reductions: column sums, then the dot product (fixed order, no atomics)"))
    register(Variant(AUX_LOSS_BACKWARD_OP, "reference", "numpy", _reference_aux_loss_backward,
                     description="numpy"))
    register(Variant(AUX_LOSS_BACKWARD_OP, "naive", "cuda", _aux_loss_backward_cupy,
                     description="CuPy broadcast of tokens_per_expert * c * grad_loss"))
