"""``router_topk``: DeepSeek-V4 router top-k with score function (compact form).

Semantics (``spec/router.md``): all arithmetic in float32 whatever the logits' dtype.

- ``softmax``, pre: s = softmax(x) over all E; select the top-k of s; weights = scaling * s[sel].
- ``softmax``, post: select the top-k of x; weights = scaling * softmax(x[sel]) over the k.
- ``sigmoid`` (s = 1/(1+exp(-x))) and ``sqrtsoftplus`` (s = sqrt(softplus(x)), softplus(x) = x
  for x > 20): select the top-k of s + bias; weights = s[sel] / (sum s[sel] + 1e-20) if k > 1,
  else s[sel]; times scaling.

Order and ties: rows of the outputs are in descending selection score; equal scores go to the
lower expert index (torch.topk-compatible).  -0.0 and +0.0 tie.

NaN rule: a NaN selection score ranks below every number (-inf included), so a NaN is selected
only when fewer than k non-NaN scores remain in the row; NaN scores among themselves go by
ascending index.  A NaN that reaches the arithmetic of a row's weights makes them NaN (for
softmax one NaN logit makes the whole row's softmax NaN, as in numpy and torch).

Infinities (as in torch, float32 arithmetic; pinned by tests/router/test_router_infinities.py):
an infinite score is an ordinary number for the selection (+inf first, -inf last among numbers),
but the weights follow IEEE arithmetic, so they can be NaN or inf:

- ``softmax`` (post): a row with +inf among its selected logits, or with every logit -inf, gets
  NaN weights (inf - inf); -inf logits selected behind a finite one weigh 0.
- ``softmax`` (pre): a +inf logit or a row of only -inf makes the softmax over E NaN: every
  score is NaN, so the NaN rule selects experts 0 .. k-1, with NaN weights.
- ``sigmoid``: s(+inf) = 1, s(-inf) = 0, finite weights; a row of only -inf selects experts
  0 .. k-1 (ties by index) with weights 0.
- ``sqrtsoftplus``: s(+inf) = +inf, s(-inf) = 0; with k = 1 a selected +inf gives weight +inf,
  with k > 1 the +inf experts weigh NaN (inf / inf) and the others 0; a row of only -inf selects
  experts 0 .. k-1 with weights 0.

Denormals: for logits below about -87, e^x is a float32 denormal; the GPU may flush it to zero
where numpy keeps it, so sqrtsoftplus/softmax scores that small can tie on the GPU and break by
index.  Everything above that range matches the reference to a few ulp.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import bool_arg
from ...core.arrays import FLOAT_DTYPES, Frame, data_ptr, dtype_name, rows_view
from ...core.op import Call, define_op
from . import kernels, rule

OP = "router_topk"
SCORE_FUNCTIONS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
INDEX_DTYPES = ("uint8", "uint16", "int16", "int32", "int64")
# largest number of experts each index dtype can name
INDEX_LIMITS = {"uint8": 256, "uint16": 65536, "int16": 32768, "int32": 2**31, "int64": 2**31}
IDX_KIND = {"uint8": 0, "uint16": 1, "int16": 2, "int32": 3, "int64": 4}  # DS4_IDX_* in common/common.cuh

__all__ = ["router_topk", "RouterArgs", "RouterProblem", "bucket_tokens"]


def bucket_tokens(t: int) -> int:
    """Token counts share decisions in buckets whose upper edges are the powers of two and the
    three-quarter points between them (..., 8192, 12288, 16384, 24576, 32768, ...; 0, 1 and 2 are
    their own): the rows kernels overtake the warp kernels inside the power-of-two bucket
    8193-16384 (bench/router/PERFORMANCE.md), so a power-of-two bucket there would be wrong at one end."""
    if t <= 2:
        return t
    p = 1 << (t - 1).bit_length()
    q = 3 * p // 4
    return q if t <= q else p


@dataclass(frozen=True)
class RouterProblem:
    """What a variant's ``supports``/``cost`` may look at (token count already bucketed)."""

    backend: str
    tokens_bucket: int
    num_experts: int
    topk: int
    dtype: str
    index_dtype: str
    score_function: str
    use_pre_softmax: bool
    has_bias: bool
    num_groups: int = 0  # 0: no group-limited routing
    group_topk: int = 0
    aligned16: bool = True  # the logits handed to the kernel start on a 16-byte boundary

    def __str__(self) -> str:
        sf = self.score_function + (" (pre)" if self.use_pre_softmax else "")
        groups = f" groups {self.num_groups}/top {self.group_topk}" if self.num_groups else ""
        align = "" if self.aligned16 else " logits not 16-byte aligned"
        return (f"backend={self.backend} T<={self.tokens_bucket} E={self.num_experts} k={self.topk} "
                f"{self.dtype} -> {self.index_dtype} {sf}{' +bias' if self.has_bias else ''}{groups}{align}")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.num_experts, self.topk, self.dtype, self.index_dtype,
                self.score_function, self.use_pre_softmax, self.has_bias, self.num_groups, self.group_topk,
                self.aligned16)


@dataclass
class RouterArgs:
    """Validated arguments handed to a variant's ``fn``.

    ``logits`` is C-contiguous ``[T, E]`` (T >= 1; variants are never called with T == 0),
    ``expert_bias`` float32 ``[E]`` or None.  The variant fills ``weights`` (float32 ``[T, k]``)
    and ``indices`` (``[T, k]``, ``problem.index_dtype``) on the current device and stream; both
    may be strided views of the caller's memory (see their ``.strides``).  ``xp`` is numpy or cupy.
    """

    logits: Any
    topk: int
    score_function: str
    use_pre_softmax: bool
    expert_bias: Any
    scaling_factor: float
    weights: Any
    indices: Any
    problem: RouterProblem
    frame: Frame

    @property
    def xp(self):
        return self.frame.xp

    @property
    def num_groups(self) -> int:
        return self.problem.num_groups

    @property
    def group_topk(self) -> int:
        return self.problem.group_topk


def _groups(num_groups, group_topk, E: int, k: int) -> tuple[int, int]:
    """Validated (num_groups, group_topk), (0, 0) without group-limited routing."""
    if num_groups is None and group_topk is None:
        return 0, 0
    if num_groups is None or group_topk is None:
        raise ValueError("num_groups and group_topk go together: give both or neither, got "
                         f"num_groups={num_groups!r}, group_topk={group_topk!r}")
    for name, v in (("num_groups", num_groups), ("group_topk", group_topk)):
        if type(v) is not int and (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral)):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    G, gt = int(num_groups), int(group_topk)
    if E % G:
        raise ValueError(f"num_groups={G} must divide E={E}")
    if k % gt:
        raise ValueError(f"group_topk={gt} must divide topk={k}")
    if gt > G:
        raise ValueError(f"group_topk={gt} must be <= num_groups={G}")
    if k // gt > E // G:
        raise ValueError(f"topk/group_topk={k // gt} must be <= E/num_groups={E // G} (experts per group)")
    return G, gt


@functools.lru_cache(maxsize=64)
def _index_dtype_cached(index_dtype) -> np.dtype:
    return _index_dtype_uncached(index_dtype)


def _index_dtype(index_dtype) -> np.dtype:
    try:
        return _index_dtype_cached(index_dtype)
    except TypeError as e:
        if "unhashable" in str(e):
            return _index_dtype_uncached(index_dtype)
        raise


def _out_index_dtype(dt) -> np.dtype:
    if dtype_name(dt) not in INDEX_DTYPES:
        raise TypeError(f"out[1] (indices) must have an integer dtype among {INDEX_DTYPES}, got {dtype_name(dt)}")
    return np.dtype(dt)


def _index_dtype_uncached(index_dtype) -> np.dtype:
    try:
        dt = np.dtype(index_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in INDEX_DTYPES:
        raise TypeError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    return dt


def _logits(logits, name: str = "logits"):
    """(frame, array, E) for a ``[..., E]`` float array argument, validated."""
    frame = Frame(logits, name)
    x = frame.array
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape [..., E] (at least 1 dimension), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {dtype_name(x.dtype)}")
    E = int(x.shape[-1])
    if E < 1:
        raise ValueError(f"{name} must have at least one expert (last dimension), got shape {tuple(x.shape)}")
    return frame, x, E


def _score_function(score_function, allowed=tuple(SCORE_FUNCTIONS), what: str = "") -> str:
    """The lower-cased score function name, or ValueError naming the argument."""
    if not isinstance(score_function, str) or score_function.lower() not in allowed:
        raise ValueError(f"score_function must be one of {tuple(allowed)}{what}, got {score_function!r}")
    return score_function.lower()


def _scaling(scaling_factor) -> float:
    if scaling_factor is None:
        return 1.0
    if isinstance(scaling_factor, numbers.Real) and not isinstance(scaling_factor, bool) and math.isfinite(scaling_factor):
        return float(scaling_factor)
    raise ValueError(f"scaling_factor must be a finite number or None, got {scaling_factor!r}")


def _split_out(out):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a (weights, indices) pair; either may be None")
    return out[0], out[1]


def _resolve_index_dtype(index_dtype, out_i, E: int) -> np.dtype:
    """The index dtype from ``index_dtype`` and/or the caller's index buffer, range-checked."""
    if index_dtype is None:
        idt = _out_index_dtype(out_i.dtype) if out_i is not None else np.dtype(np.int32)
    else:
        idt = _index_dtype(index_dtype)
        if out_i is not None and out_i.dtype != idt:
            raise TypeError(f"out[1] (indices) has dtype {dtype_name(out_i.dtype)} but index_dtype={dtype_name(idt)}")
    idn = dtype_name(idt)
    if E > INDEX_LIMITS[idn]:
        raise ValueError(f"index dtype {idn} holds expert ids up to {INDEX_LIMITS[idn] - 1}, but E={E}")
    return idt


def _outputs(frame, out_w, out_i, lead, k, idt):
    """(weights as given, weights [T, k] view, indices as given, indices [T, k] view)."""
    T = math.prod(lead)
    if out_w is None:
        w_full = frame.empty(lead + (k,), np.float32)
        w2 = w_full.reshape(T, k)
    else:
        w_full = frame.convert(out_w, "out[0] (weights)", written=True)
        if w_full.dtype != np.float32:
            raise TypeError(f"out[0] (weights) must have dtype float32, got {dtype_name(w_full.dtype)}")
        w2 = rows_view(frame.xp, w_full, lead, k, "out[0] (weights)")
    if out_i is None:
        i_full = frame.empty(lead + (k,), idt)
        i2 = i_full.reshape(T, k)
    else:
        i_full = out_i
        i2 = rows_view(frame.xp, i_full, lead, k, "out[1] (indices)")
    return w_full, w2, i_full, i2


def contiguous_rows(frame, x):
    """The ``[T, E]`` C-contiguous array the kernels read: other layouts are copied (a fresh
    allocation, so aligned: ``RouterProblem.aligned16`` is computed to match)."""
    E = int(x.shape[-1])
    T = math.prod(x.shape[:-1])
    if not x.flags.c_contiguous:
        x = frame.xp.ascontiguousarray(x)
    return x if x.ndim == 2 else x.reshape(T, E)


@define_op(OP, rule=rule.router_topk_rule, kernels=kernels.FAMILIES)
def router_topk(logits, topk: int, *, score_function: str = "softmax", use_pre_softmax: bool = False,
                expert_bias=None, scaling_factor: Optional[float] = None, num_groups: Optional[int] = None,
                group_topk: Optional[int] = None, index_dtype=None, out=None, plan_only: bool = False):
    """Top-k expert selection with score function, compact output.

    Args:
        logits: ``[..., E]`` float32, float16 or bfloat16.  numpy arrays (and CPU torch tensors)
            run on the reference backend; CuPy arrays, torch CUDA tensors (zero-copy, torch's
            current stream, torch tensors back) and ``__cuda_array_interface__`` objects run on
            the GPU.  Rows must be contiguous: other layouts are copied first (one extra kernel).
        topk: k, ``1 <= k <= E``.
        score_function: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``.
        use_pre_softmax: softmax over all E before selection (softmax only).
        expert_bias: float32 ``[E]``, added to the scores for selection only
            (sigmoid / sqrtsoftplus only).
        scaling_factor: multiplies the weights (default 1.0).
        num_groups, group_topk: group-limited routing: experts split into ``num_groups`` equal
            groups; a group's score is the sum of its top ``topk // group_topk`` selection scores;
            only the top ``group_topk`` groups stay selectable (the rest count as -inf).
            Requires ``E % num_groups == 0``, ``topk % group_topk == 0``,
            ``group_topk <= num_groups`` and ``topk // group_topk <= E // num_groups``.
        index_dtype: ``int32`` (default), ``int64``, ``int16`` (E <= 32768), or the narrow
            ``uint8`` (E <= 256) / ``uint16`` (E <= 65536); defaults to the dtype of ``out[1]``.
        out: optional ``(weights, indices)`` to fill in place, shapes ``[..., k]``; either may be
            None.  They may be strided views (e.g. one layer's slice of a routing-capture buffer
            ``buf[t0:t1, layer, :]``) as long as the leading dims merge into one row axis.
        variant: force a variant by name (see :func:`ds4kern.explain`).

    Returns:
        ``(weights, indices)``: float32 ``[..., k]`` and ``[..., k]`` of ``index_dtype``, each row in
        descending selection score, equal scores by ascending expert index.  NaN and infinite
        logits: see the module docstring (``ds4kern.ops.router.api``); e.g. a +inf logit makes
        softmax weights NaN, as in torch.
    """
    frame, x, E = _logits(logits)
    if type(topk) is not int and (isinstance(topk, (bool, np.bool_)) or not isinstance(topk, numbers.Integral)):
        raise TypeError(f"topk must be an int, got {topk!r}")
    k = int(topk)
    if not 1 <= k <= E:
        raise ValueError(f"topk must satisfy 1 <= topk <= E={E}, got {k}")
    sf = _score_function(score_function)
    pre = bool_arg("use_pre_softmax", use_pre_softmax)
    if pre and sf != "softmax":
        raise ValueError(f"use_pre_softmax=True applies to score_function='softmax' only, got {sf!r}")
    scale = _scaling(scaling_factor)
    G, gt = _groups(num_groups, group_topk, E, k)
    out_w, out_i = (None, None) if out is None else _split_out(out)
    if out_i is not None:
        out_i = frame.convert(out_i, "out[1] (indices)", written=True)
    idt = _resolve_index_dtype(index_dtype, out_i, E)
    bias = None
    if expert_bias is not None:
        if sf == "softmax":
            raise ValueError("expert_bias applies to score_function 'sigmoid' or 'sqrtsoftplus' only, not 'softmax'")
        bias = frame.convert(expert_bias, "expert_bias")
        if bias.dtype != np.float32:
            raise TypeError(f"expert_bias must be float32, got {dtype_name(bias.dtype)}")
        if tuple(bias.shape) != (E,):
            raise ValueError(f"expert_bias must have shape ({E},) to match logits, got {tuple(bias.shape)}")
        bias = frame.xp.ascontiguousarray(bias)

    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    aligned = data_ptr(x) % 16 == 0 if x.flags.c_contiguous else True
    problem = RouterProblem(frame.backend, bucket_tokens(T), E, k, dtype_name(x.dtype), dtype_name(idt), sf, pre,
                            bias is not None, G, gt, aligned)
    if plan_only:
        return Call(problem, RouterArgs(None, k, sf, pre, bias, scale, None, None, problem, frame), frame)
    x2 = contiguous_rows(frame, x)
    w_full, w2, i_full, i2 = _outputs(frame, out_w, out_i, lead, k, idt)
    args = RouterArgs(x2, k, sf, pre, bias, scale, w2, i2, problem, frame)
    return Call(problem, args, frame, (w_full, i_full), skip=T == 0)
