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

Denormals: for logits below about -87, e^x is a float32 denormal; the GPU may flush it to zero
where numpy keeps it, so sqrtsoftplus/softmax scores that small can tie on the GPU and break by
index.  Everything above that range matches the reference to a few ulp.
"""

from __future__ import annotations

import functools
import math
import os
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import dispatch, kernels
from .._arrays import FLOAT_DTYPES, Frame, dtype_name, rows_view
from ..hookspecs import hookimpl
from ..registry import Variant

OP = "router_topk"
SCORE_FUNCTIONS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
INDEX_DTYPES = ("uint8", "uint16", "int16", "int32", "int64")
# largest number of experts each index dtype can name
INDEX_LIMITS = {"uint8": 256, "uint16": 65536, "int16": 32768, "int32": 2**31, "int64": 2**31}
IDX_KIND = {"uint8": 0, "uint16": 1, "int16": 2, "int32": 3, "int64": 4}
EPS = np.float32(1e-20)

__all__ = ["router_topk", "router_hash", "RouterArgs", "RouterProblem", "RouterHashArgs", "RouterHashProblem",
           "reference_router_topk", "reference_router_hash", "order_keys"]


def _bucket_tokens(t: int) -> int:
    """Token counts share decisions in buckets whose upper edges are the powers of two and the
    three-quarter points between them (..., 8192, 12288, 16384, 24576, 32768, ...; 0, 1 and 2 are
    their own): the rows kernels overtake the warp kernels inside the power-of-two bucket
    8193-16384 (bench/NOTES.md), so a power-of-two bucket there would be wrong at one end."""
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

    def __str__(self) -> str:
        sf = self.score_function + (" (pre)" if self.use_pre_softmax else "")
        groups = f" groups {self.num_groups}/top {self.group_topk}" if self.num_groups else ""
        return (f"backend={self.backend} T<={self.tokens_bucket} E={self.num_experts} k={self.topk} "
                f"{self.dtype} -> {self.index_dtype} {sf}{' +bias' if self.has_bias else ''}{groups}")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.num_experts, self.topk, self.dtype, self.index_dtype,
                self.score_function, self.use_pre_softmax, self.has_bias, self.num_groups, self.group_topk)


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
        w_full = frame.convert(out_w, "out[0] (weights)")
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


def _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor,
             index_dtype, out, num_groups=None, group_topk=None, allocate=True) -> tuple[RouterArgs, tuple]:
    frame, x, E = _logits(logits)
    if type(topk) is not int and (isinstance(topk, (bool, np.bool_)) or not isinstance(topk, numbers.Integral)):
        raise TypeError(f"topk must be an int, got {topk!r}")
    k = int(topk)
    if not 1 <= k <= E:
        raise ValueError(f"topk must satisfy 1 <= topk <= E={E}, got {k}")
    sf = _score_function(score_function)
    if not isinstance(use_pre_softmax, (bool, np.bool_)):
        raise TypeError(f"use_pre_softmax must be a bool, got {use_pre_softmax!r}")
    pre = bool(use_pre_softmax)
    if pre and sf != "softmax":
        raise ValueError(f"use_pre_softmax=True applies to score_function='softmax' only, got {sf!r}")
    scale = _scaling(scaling_factor)
    G, gt = _groups(num_groups, group_topk, E, k)
    out_w, out_i = (None, None) if out is None else _split_out(out)
    if out_i is not None:
        out_i = frame.convert(out_i, "out[1] (indices)")
    idt = _resolve_index_dtype(index_dtype, out_i, E)
    idn = dtype_name(idt)
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
    problem = RouterProblem(frame.backend, _bucket_tokens(T), E, k, dtype_name(x.dtype), idn, sf, pre,
                            bias is not None, G, gt)
    if not allocate:
        return RouterArgs(None, k, sf, pre, bias, scale, None, None, problem, frame), ()

    if not x.flags.c_contiguous:
        x = frame.xp.ascontiguousarray(x)  # a copy: rows must be contiguous
    x2 = x if x.ndim == 2 else x.reshape(T, E)
    w_full, w2, i_full, i2 = _outputs(frame, out_w, out_i, lead, k, idt)
    args = RouterArgs(x2, k, sf, pre, bias, scale, w2, i2, problem, frame)
    return args, (w_full, i_full)


def router_topk(logits, topk: int, *, score_function: str = "softmax", use_pre_softmax: bool = False,
                expert_bias=None, scaling_factor: Optional[float] = None, num_groups: Optional[int] = None,
                group_topk: Optional[int] = None, index_dtype=None, out=None, variant: Optional[str] = None):
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
        descending selection score, equal scores by ascending expert index.
    """
    args, (w_full, i_full) = _prepare(logits, topk, score_function, use_pre_softmax, expert_bias,
                                      scaling_factor, index_dtype, out, num_groups, group_topk)
    if args.logits.shape[0] > 0:
        v = dispatch.select(OP, args.problem, variant, run=lambda var: args.frame.run(var.fn, args))
        args.frame.run(v.fn, args)
    else:
        dispatch.select(OP, args.problem, variant)  # still validates variant=
    return args.frame.give_back(w_full), args.frame.give_back(i_full)


def explain_router_topk(logits, topk, *, score_function="softmax", use_pre_softmax=False, expert_bias=None,
                        scaling_factor=None, num_groups=None, group_topk=None, index_dtype=None, out=None,
                        variant=None) -> dispatch.Decision:
    args, _ = _prepare(logits, topk, score_function, use_pre_softmax, expert_bias, scaling_factor,
                       index_dtype, out, num_groups, group_topk, allocate=False)
    return dispatch.decide(OP, args.problem, variant)


# ---------------------------------------------------------------------------------------
# reference backend (numpy, float32 arithmetic as in the kernels)

def order_keys(s: np.ndarray) -> np.ndarray:
    """uint32 selection keys with the same total order as ``ds4_order_key`` in common.cuh."""
    s = np.asarray(s, dtype=np.float32)
    s = np.where(s == 0, np.float32(0), s)  # fold -0 onto +0
    u = s.view(np.uint32)
    key = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)
    key[np.isnan(s)] = 1
    return key


def topk_by_key(sel: np.ndarray, k: int) -> np.ndarray:
    """Indices [T, k] of the k largest selection scores per row; ties by ascending index."""
    T, E = sel.shape
    comb = (order_keys(sel).astype(np.uint64) << np.uint64(32)) | (
        np.uint64(0xFFFFFFFF) - np.arange(E, dtype=np.uint64))
    part = np.argpartition(comb, E - k, axis=1)[:, E - k:] if k < E else np.broadcast_to(np.arange(E), (T, E))
    vals = np.take_along_axis(comb, part, axis=1)
    order = np.argsort(vals, axis=1)[:, ::-1]  # the combined values are unique
    return np.take_along_axis(part, order, axis=1)


def score(x: np.ndarray, score_function: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        if score_function == "sigmoid":
            return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
        sp = np.where(x > np.float32(20), x, np.log1p(np.exp(x)))
        return np.sqrt(sp).astype(np.float32)


def group_limit(sel: np.ndarray, k: int, num_groups: int, group_topk: int) -> np.ndarray:
    """Selection scores with every expert outside the top ``group_topk`` groups set to -inf.

    Group score: the group's top ``k // group_topk`` selection scores (same order and tie rule
    as the selection), added in descending order in float32.
    """
    T, E = sel.shape
    gs, m = E // num_groups, k // group_topk
    flat = sel.reshape(T * num_groups, gs)
    top = np.take_along_axis(flat, topk_by_key(flat, m), axis=1)
    gscore = top[:, 0].copy()
    for j in range(1, m):
        gscore = (gscore + top[:, j]).astype(np.float32)
    keep = topk_by_key(gscore.reshape(T, num_groups), group_topk)
    mask = np.zeros((T, num_groups), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return np.where(np.repeat(mask, gs, axis=1), sel, np.float32(-np.inf)).astype(np.float32)


def reference_router_topk(logits, k, score_function, use_pre_softmax, expert_bias, scaling_factor,
                          num_groups=0, group_topk=0):
    """The reference computation on host arrays: returns (weights float32 [T,k], indices int64)."""
    x = np.asarray(logits).astype(np.float32)
    scale = np.float32(scaling_factor)

    def select(sel):
        return topk_by_key(group_limit(sel, k, num_groups, group_topk) if num_groups else sel, k)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if score_function == "softmax" and use_pre_softmax:
            mx = np.max(x, axis=1, keepdims=True)
            s = np.exp(x - mx)
            s = (s / s.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float32)
            idx = select(s)
            w = np.take_along_axis(s, idx, axis=1)
        elif score_function == "softmax":
            idx = select(x)
            xs = np.take_along_axis(x, idx, axis=1)
            v = np.exp(xs - xs[:, :1])
            w = v / v.sum(axis=1, keepdims=True, dtype=np.float32)
        else:
            s = score(x, score_function)
            sel = s if expert_bias is None else s + np.asarray(expert_bias, np.float32)
            idx = select(sel)
            w = np.take_along_axis(s, idx, axis=1)
            if k > 1:
                w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + EPS)
        w = (w * scale).astype(np.float32)
    return w, idx


def _reference(a: RouterArgs) -> None:
    w, idx = reference_router_topk(a.logits, a.topk, a.score_function, a.use_pre_softmax, a.expert_bias,
                                   a.scaling_factor, a.num_groups, a.group_topk)
    a.weights[...] = w
    a.indices[...] = idx


# ---------------------------------------------------------------------------------------
# naive CUDA variant: one warp per token, k rounds of warp arg-max

_CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# Values per lane the kernel is instantiated for (registers hold 32*VPL keys per warp).
NAIVE_VPL = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96)
NAIVE_MAX_E = 32 * NAIVE_VPL[-1]
NAIVE_WARPS_PER_BLOCK = 4


def _naive_name(dtype: str, vpl: int) -> str:
    return f"router_topk_naive<{_CTYPE[dtype]}, {vpl}>"


# threshold variant: lane-max threshold, candidates compacted one per lane (E <= 32 * 32)
THRESHOLD_VPL = (1, 2, 4, 8, 16, 32)
THRESHOLD_MAX_E = 32 * THRESHOLD_VPL[-1]
# Static rule, from bench/NOTES.md (H100, 2026-11-25): threshold beats naive at T >= 4096
# (by 4-8%) and loses at T <= 128 (6.1-6.4 vs 5.3-5.7 us); nothing was measured in between.
# The rule takes the buckets from 4096 (T > 3072).  Override with
# DS4KERN_ROUTER_THRESHOLD_MIN_TOKENS (a bucket edge) or DS4KERN_VARIANT.
THRESHOLD_MIN_TOKENS = int(os.environ.get("DS4KERN_ROUTER_THRESHOLD_MIN_TOKENS", "4096"))


def _threshold_cost(p: RouterProblem) -> float:
    return 0.9 if p.tokens_bucket >= THRESHOLD_MIN_TOKENS else 1.1


def _threshold_name(dtype: str, vpl: int) -> str:
    return f"router_topk_threshold<{_CTYPE[dtype]}, {vpl}>"


SSP_PROBE = "router_ssp_approx_probe<0>"


def dense_name(dtype: str, vpl: int) -> str:
    """TE dense form (ds4kern.ops.router_te), same source."""
    return f"router_topk_dense_naive<{_CTYPE[dtype]}, {vpl}>"


def backward_name(dtype: str, vec: int) -> str:
    return f"router_topk_backward_naive<{_CTYPE[dtype]}, {vec}>"


BACKWARD_IDX_SEG = (16, 32)  # lanes per token (32 / seg rows per warp)


def backward_idx_name(dtype: str, seg: int) -> str:
    """Backward from dense indices, a segment of ``seg`` lanes per token (not softmax pre)."""
    return f"router_topk_backward_idx<{_CTYPE[dtype]}, {seg}>"


def backward_idx_seg(dtype: str, k: int) -> int:
    """Lanes per token of the dense-index backward.  From bench/NOTES.md (H100, 2026-11-25, E=256,
    k=6, T=65536): bfloat16 8 / 16 / 32 lanes 31.1 / 30.2 / 34.0 us, float32 56.7 / 47.4 / 44.5."""
    return 16 if dtype != "float32" and k <= 16 else 32


RADIX_MAX_SMEM = 48 * 1024  # dynamic shared memory without an opt-in


def _radix_smem(E: int, k: int) -> int:
    return 4 * (E + 256 + 2 * k)


def radix_name(dtype: str) -> str:
    return f"router_topk_radix<{_CTYPE[dtype]}>"


# warp variants (screened / grouped): contiguous lanes, compile-time score function
WARP_VPL = (1, 2, 4, 8, 16)
WARP_MAX_E = 32 * WARP_VPL[-1]
WARP_MAX_K = 32  # one candidate per lane
WARP_THREADS = 256  # DS4_WARP_THREADS
# blocks per SM in the grid (the rest of the tokens by grid stride); env override for sweeps
WARP_BLOCKS_PER_SM = int(os.environ.get("DS4KERN_ROUTER_WARP_BLOCKS_PER_SM", "4"))
# Up to this many tokens, kernels on exact keys (grouped, softmax) skip the screening threshold and
# run k exact rounds over all keys: fewer dependent warp reductions per token.  From bench/NOTES.md
# (H100, 2026-11-25, V3 style): T=1 4.95 -> 4.51 us, T=128 5.43 -> 5.19, T=1024 5.56 -> 5.35, but
# T=4096 9.97 -> 11.3 and T=65536 102 -> 128 us.  Env override for sweeps.
WARP_DIRECT_MAX_TOKENS = int(os.environ.get("DS4KERN_ROUTER_WARP_DIRECT_MAX_TOKENS", "1024"))
_WARP_SF = {("softmax", False): 0, ("sigmoid", False): 1, ("sqrtsoftplus", False): 2, ("softmax", True): 3}
SCREEN_PROBES = {"sigmoid": "router_screen_probe<1>", "sqrtsoftplus": "router_screen_probe<2>"}


def warp_name(dtype: str, sf: int, grouped: bool, vpl: int) -> str:
    return f"router_topk_warp<{_CTYPE[dtype]}, {sf}, {'true' if grouped else 'false'}, {vpl}>"


# rows variant: one thread per token (cuda_src/router_rows.cu)
ROWS_KMAX = (8, 16)
ROWS_MAX_E = 256
ROWS_WARPS = 2  # DS4_ROWS_WARPS
_ROWS_SF = {"sigmoid": 1, "sqrtsoftplus": 2}


ROWS_LPT = (1, 2)  # lanes per token (2: each lane takes half the row; needs E % 16 == 0)
_ROWS_LPT_ENV = int(os.environ.get("DS4KERN_ROUTER_ROWS_LPT", "2"))


def rows_name(dtype: str, sf: int, kmax: int, lpt: int = 1) -> str:
    return f"router_topk_rows<{_CTYPE[dtype]}, {sf}, {kmax}, {lpt}>"


def rows_lanes(E: int, kmax: int) -> int:
    """Lanes per token the rows kernel uses (2 only with the 8-entry list: registers)."""
    return 2 if _ROWS_LPT_ENV == 2 and E % 16 == 0 and kmax == 8 else 1


def rows_grouped_name(dtype: str, sf: int) -> str:
    return f"router_topk_rows_grouped<{_CTYPE[dtype]}, {sf}>"


ROWS_GROUPED_MAX_M = 2  # group score = sum of the top k / group_topk <= 2 (two registers per lane)


def rows_smem(kmax: int, warps: int = ROWS_WARPS, grouped: bool = False) -> int:
    """Dynamic shared memory of one block of ``warps`` warps (DS4_ROWS_WARPS): candidate lists
    (logit and expert; grouped: 8 more rows, the group sums and m-th scores share them), bias
    table, max |bias|."""
    return warps * (kmax + (24 if grouped else 16)) * 32 * 5 + (256 + 4) * 4


ROWS_KERNELS = kernels.register_family(kernels.KernelFamily(
    "router_rows.cu",
    tuple(rows_name(d, sf, km, lp) for d in _CTYPE for sf in sorted(_ROWS_SF.values()) for km in ROWS_KMAX
          for lp in ROWS_LPT if lp == 1 or km == 8)
    + tuple(rows_grouped_name(d, sf) for d in _CTYPE for sf in sorted(_ROWS_SF.values())),
))

AUX_VPL = tuple(v for v in NAIVE_VPL if v <= 32)  # one selection bit per register slot


def aux_scores_name(dtype: str, vpl: int) -> str:
    return f"router_aux_scores_naive<{_CTYPE[dtype]}, {vpl}>"


ROUTER_KERNELS = kernels.register_family(kernels.KernelFamily(
    "router.cu",
    tuple(_naive_name(d, v) for d in _CTYPE for v in NAIVE_VPL)
    + tuple(_threshold_name(d, v) for d in _CTYPE for v in THRESHOLD_VPL)
    + (SSP_PROBE,)
    + tuple(dense_name(d, v) for d in _CTYPE for v in NAIVE_VPL)
    + tuple(backward_name(d, v) for d in _CTYPE for v in (1, 4))
    + tuple(backward_idx_name(d, sg) for d in _CTYPE for sg in BACKWARD_IDX_SEG)
    + tuple(aux_scores_name(d, v) for d in _CTYPE for v in AUX_VPL)
    + tuple(radix_name(d) for d in _CTYPE)
    + tuple(warp_name(d, sf, g, v) for d in _CTYPE for sf in sorted(set(_WARP_SF.values()))
            for g in (False, True) for v in WARP_VPL)
    + tuple(SCREEN_PROBES.values()),
))


def _naive_supports(p: RouterProblem) -> Optional[str]:
    if p.num_experts > NAIVE_MAX_E:
        return f"E={p.num_experts} exceeds {NAIVE_MAX_E}, the most one warp holds in registers"
    if p.num_groups and (p.num_experts > 1024 or p.num_groups > 32):
        return "group-limited routing needs E <= 1024 and num_groups <= 32 in this kernel"
    return None


def _threshold_supports(p: RouterProblem) -> Optional[str]:
    if p.num_experts > THRESHOLD_MAX_E:
        return f"E={p.num_experts} exceeds {THRESHOLD_MAX_E} (32 register slots per lane)"
    if p.num_groups:
        return "group-limited routing is not implemented in this variant"
    return None


def _warp_vpl(E: int) -> int:
    return next(v for v in WARP_VPL if 32 * v >= E)


def _warp_common(p: RouterProblem) -> Optional[str]:
    if p.num_experts > WARP_MAX_E:
        return f"E={p.num_experts} exceeds {WARP_MAX_E} (16 register slots per lane)"
    if p.topk > WARP_MAX_K:
        return f"k={p.topk} exceeds {WARP_MAX_K} (one candidate per lane)"
    return None


def _screened_supports(p: RouterProblem) -> Optional[str]:
    if p.num_groups:
        return "group-limited routing is the grouped variant's"
    return _warp_common(p)


def group_lanes(E: int, num_groups: int) -> Optional[int]:
    """Lanes per group in the grouped kernel, or None where groups do not fall on whole lanes."""
    vpl = _warp_vpl(E)
    gs = E // num_groups
    if gs % vpl:
        return None
    lpg = gs // vpl
    return lpg if lpg & (lpg - 1) == 0 else None


def _grouped_supports(p: RouterProblem) -> Optional[str]:
    if not p.num_groups:
        return "needs group-limited routing (num_groups, group_topk)"
    why = _warp_common(p)
    if why:
        return why
    if p.num_groups > 32:
        return f"num_groups={p.num_groups} exceeds 32"
    if group_lanes(p.num_experts, p.num_groups) is None:
        return (f"groups of E/num_groups={p.num_experts // p.num_groups} experts do not fill a power-of-two "
                f"number of lanes of {_warp_vpl(p.num_experts)} experts")
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
    vpl = _warp_vpl(E)
    grouped = bool(p.num_groups)
    kern = ROUTER_KERNELS.kernel(warp_name(p.dtype, _WARP_SF[(a.score_function, a.use_pre_softmax)], grouped, vpl))
    warps = WARP_THREADS // 32
    grid = min((T + warps - 1) // warps, WARP_BLOCKS_PER_SM * _sm_count(a.frame.xp))
    vec = int(a.logits.data.ptr % 16 == 0 and (E * a.logits.itemsize) % 16 == 0 and E >= vpl)
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    direct = int(T <= WARP_DIRECT_MAX_TOKENS)  # (used where the keys are exact: groups, softmax)
    kern((grid,), (WARP_THREADS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.float32(a.scaling_factor),
          np.int32(vec)) + _output_args(a) + (np.int32(a.num_groups), np.int32(a.group_topk), np.int32(direct)))


def _rows_supports(p: RouterProblem) -> Optional[str]:
    if p.score_function not in _ROWS_SF or p.use_pre_softmax:
        return "only sigmoid and sqrtsoftplus scores (softmax needs the row's normaliser first)"
    if p.num_groups:
        E, G = p.num_experts, p.num_groups
        if E > ROWS_MAX_E or (E // G) % 16:
            return (f"group-limited routing needs E <= {ROWS_MAX_E} and groups of a multiple of 16 experts "
                    f"(E/num_groups={E // G}: whole chunks of 8 for both lanes of a token)")
        if p.group_topk > 7 and p.group_topk != G:
            return f"group-limited routing needs group_topk <= 7 or all groups kept (group_topk={p.group_topk})"
        if p.topk > ROWS_KMAX[0] or p.topk // p.group_topk > ROWS_GROUPED_MAX_M:
            return (f"group-limited routing needs k <= {ROWS_KMAX[0]} and k/group_topk <= {ROWS_GROUPED_MAX_M} "
                    f"(k={p.topk}, group_topk={p.group_topk})")
        return None
    if p.num_experts % 8 or p.num_experts > ROWS_MAX_E:
        return f"needs E a multiple of 8 and at most {ROWS_MAX_E} (chunks of 8 experts, 32-bit chunk masks)"
    if p.topk > ROWS_KMAX[-1]:
        return f"k={p.topk} exceeds {ROWS_KMAX[-1]} (the per-thread sorted list)"
    return None


def _rows(a: RouterArgs) -> None:
    T, E = a.logits.shape
    if a.logits.data.ptr % 16:  # rows are read in 16-byte loads
        return _warp(a)
    p = a.problem
    sf = _ROWS_SF[a.score_function]
    if p.num_groups:  # two lanes per token, 8-entry list
        kmax, lpt = ROWS_KMAX[0], 2
        kern = ROWS_KERNELS.kernel(rows_grouped_name(p.dtype, sf))
        extra = (np.int32(a.num_groups), np.int32(a.group_topk))
    else:
        kmax = next(km for km in ROWS_KMAX if km >= a.topk)
        lpt = rows_lanes(E, kmax)
        kern = ROWS_KERNELS.kernel(rows_name(p.dtype, sf, kmax, lpt))
        extra = ()
    smem = rows_smem(kmax, grouped=bool(p.num_groups))
    tiles = (T + 32 // lpt - 1) // (32 // lpt)
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    kern(((tiles + ROWS_WARPS - 1) // ROWS_WARPS,), (32 * ROWS_WARPS,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.float32(a.scaling_factor))
         + _output_args(a) + extra, shared_mem=smem)


def _radix_supports(p: RouterProblem) -> Optional[str]:
    if p.num_groups:
        return "group-limited routing is not implemented in this variant"
    if _radix_smem(p.num_experts, p.topk) > RADIX_MAX_SMEM:
        return (f"E={p.num_experts}, k={p.topk} need {_radix_smem(p.num_experts, p.topk)} bytes of shared memory "
                f"(keys, histogram, selection); at most {RADIX_MAX_SMEM}")
    return None


# Static rule, from bench/NOTES.md (H100, 2026-11-25, T=16384, sigmoid + bias): radix beats naive
# and threshold from k = 32 at every E measured (256, 1024, 3072) and from k = 16 at E = 3072; it
# loses at small k (E=256 k=6: 57.5 vs 25.4 us; E=1024 k=8: 146 vs 116 us).  Above E = 3072 it is
# the only kernel.  Override with DS4KERN_ROUTER_RADIX_MIN_K (a k) or DS4KERN_VARIANT.
RADIX_MIN_K = int(os.environ.get("DS4KERN_ROUTER_RADIX_MIN_K", "32"))


def _radix_cost(p: RouterProblem) -> float:
    wins = p.topk >= RADIX_MIN_K or (p.num_experts > 1024 and p.topk >= 16)
    return 0.8 if wins else 1.2


# Static rule, from bench/NOTES.md (H100, 2026-11-25): screened beats naive and threshold at
# every T measured for E <= 512, k < 32 (Flash T=128: 3.8 vs 5.8-6.2 us; T=65536: 59 vs 90-104 us;
# T=16384 sigmoid + bias: E=256 k=6 16.2 vs 25.4, k=16 21.3 vs 33.6, E=512 k=8 34.3 vs 55.5 us) and
# loses from k = 32 (E=256: 76 vs radix 65 and naive 71 us).  grouped beats naive at every T
# measured (V3 style: 5.3 vs 9.6 us at T=128, 100 vs 315 us at T=65536).
def _screened_cost(p: RouterProblem) -> float:
    return 0.7 if p.topk < RADIX_MIN_K else 1.15


# Static rule, from bench/NOTES.md (H100, 2026-11-25, Flash: E=256, k=6, sqrtsoftplus + bias): rows
# beats screened from T = 32768 (bf16: 29.0 vs 33.6 us; T=65536 39.9 vs 61.4; T=131072 82 vs 121)
# and loses below (T=16384: 23.3 vs 18.5; T=128: 18.7 vs 3.8: one 32-token tile per warp is a long
# serial chain).  float32 joined in the fifth session, with the loads issued ahead in the rows
# kernel (same run: T=32768 29.8 vs 32.4 us, T=65536 56.3 vs 59.4; before: 57.9 vs 59.8).
# Inside 8193-16384 (eighth session, graph us, rows / screened): 8448 13.5 / 10.5 float32, 12.8 /
# 10.3 bf16; 12288 14.8 / 14.3, 13.6 / 14.3; 16384 16.4 / 18.1, 14.2 / 18.0 (twelfth session:
# 16.1 / 17.9, 14.0 / 17.4); 24576 20.3 / 25.6.  So rows from the bucket 12289-16384 (T > 12288).
# Override with DS4KERN_ROUTER_ROWS_MIN_TOKENS (a bucket edge, see _bucket_tokens) or
# DS4KERN_VARIANT.
ROWS_MIN_TOKENS = int(os.environ.get("DS4KERN_ROUTER_ROWS_MIN_TOKENS", "16384"))


# Group-limited routing, rows' grouped form against `grouped` (bench/NOTES.md, H100, 2026-11-25, V3
# style): rows wins from T = 12288 (float32 20.2 vs 22.2 us; 16384: 23.6 vs 28.6, bf16 21.8 vs
# 28.1; 24576: 27.6 vs 41.3; T=65536 58.2 vs 99.7 / 48.4 vs 99.5) and loses at 8448 (18.2 vs 16.1)
# and 4096 (18.1 vs 9.8).  The 8193-12288 bucket is mixed (twelfth session, with the tighter
# sigmoid bound: 16384 21.6 vs 28.1 float32, 19.7 vs 27.7 bf16): rows from the bucket 12289-16384,
# as for Flash.  Override with DS4KERN_ROUTER_ROWS_GROUPED_MIN_TOKENS or DS4KERN_VARIANT.
ROWS_GROUPED_MIN_TOKENS = int(os.environ.get("DS4KERN_ROUTER_ROWS_GROUPED_MIN_TOKENS", "16384"))


def _rows_cost(p: RouterProblem) -> float:
    if p.num_groups:
        return 0.6 if p.tokens_bucket >= ROWS_GROUPED_MIN_TOKENS else 1.5
    return 0.6 if p.tokens_bucket >= ROWS_MIN_TOKENS else 1.5


def _radix(a: RouterArgs) -> None:
    T, E = a.logits.shape
    kern = ROUTER_KERNELS.kernel(radix_name(a.problem.dtype))
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)
    kern((T,), (32,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.int32(a.use_pre_softmax), np.float32(a.scaling_factor)) + _output_args(a),
         shared_mem=_radix_smem(E, a.topk))


def _naive(a: RouterArgs) -> None:
    _launch_rounds(a, NAIVE_VPL, _naive_name, (np.int32(a.num_groups), np.int32(a.group_topk)))


def _threshold(a: RouterArgs) -> None:
    _launch_rounds(a, THRESHOLD_VPL, _threshold_name, ())


def _output_args(a) -> tuple:
    """Kernel arguments of the (possibly strided) outputs: weights, their row and column strides,
    indices, their strides (all in elements) and the index kind."""
    w, i = a.weights, a.indices
    return (w, np.int64(w.strides[0] // 4), np.int64(w.strides[1] // 4),
            i, np.int64(i.strides[0] // i.itemsize), np.int64(i.strides[1] // i.itemsize),
            np.int32(IDX_KIND[a.problem.index_dtype]))


def _launch_rounds(a: RouterArgs, vpls, name_of, extra: tuple) -> None:
    T, E = a.logits.shape
    vpl = next(v for v in vpls if 32 * v >= E)
    kern = ROUTER_KERNELS.kernel(name_of(a.problem.dtype, vpl))
    grid = (T + NAIVE_WARPS_PER_BLOCK - 1) // NAIVE_WARPS_PER_BLOCK
    bias = a.expert_bias if a.expert_bias is not None else np.uint64(0)  # nullptr
    kern((grid,), (32 * NAIVE_WARPS_PER_BLOCK,),
         (a.logits, bias, np.int64(T), np.int32(E), np.int32(a.topk),
          np.int32(SCORE_FUNCTIONS[a.score_function]), np.int32(a.use_pre_softmax),
          np.float32(a.scaling_factor)) + _output_args(a) + extra)


# ---------------------------------------------------------------------------------------
# router_hash: hash-routed layers (DeepSeek-V4 layers 0-2)

HASH_OP = "router_hash"
HASH_SCORE_FUNCTIONS = ("sqrtsoftplus", "sigmoid")


@dataclass(frozen=True)
class RouterHashProblem:
    backend: str
    tokens_bucket: int
    num_experts: int
    topk: int
    dtype: str
    index_dtype: str
    score_function: str

    def __str__(self) -> str:
        return (f"backend={self.backend} T<={self.tokens_bucket} E={self.num_experts} k={self.topk} "
                f"{self.dtype} -> {self.index_dtype} {self.score_function} (hash table)")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.num_experts, self.topk, self.dtype, self.index_dtype, self.score_function)


@dataclass
class RouterHashArgs:
    """Validated arguments of ``router_hash`` handed to a variant: ``logits`` [T, E] contiguous,
    ``tid2eid`` int32 [vocab, k] contiguous, ``token_ids`` int32/int64 [T] contiguous; the
    variant fills ``weights`` and ``indices`` ([T, k], possibly strided); ``errors`` is None or a
    device int32 [1] counter."""

    logits: Any
    tid2eid: Any
    token_ids: Any
    score_function: str
    scaling_factor: float
    weights: Any
    indices: Any
    errors: Any
    problem: RouterHashProblem
    frame: Frame


def _prepare_hash(logits, tid2eid, token_ids, score_function, scaling_factor, index_dtype, out, errors,
                  allocate=True):
    frame, x, E = _logits(logits)
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    table = frame.convert(tid2eid, "tid2eid")
    if table.ndim != 2 or table.shape[1] < 1:
        raise ValueError(f"tid2eid must have shape [vocab, k] with k >= 1, got {tuple(table.shape)}")
    if table.dtype != np.int32:
        raise TypeError(f"tid2eid must be int32, got {dtype_name(table.dtype)}")
    k = int(table.shape[1])
    if k > E:
        raise ValueError(f"tid2eid has k={k} columns but logits have only E={E} experts")
    ids = frame.convert(token_ids, "token_ids")
    if ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"token_ids must be int32 or int64, got {dtype_name(ids.dtype)}")
    if tuple(ids.shape) != lead:
        raise ValueError(f"token_ids must have shape {lead} (the leading dims of logits), got {tuple(ids.shape)}")
    sf = _score_function(score_function, HASH_SCORE_FUNCTIONS, " for hash routing")
    scale = _scaling(scaling_factor)
    if frame.backend == "numpy":
        # the reference validates the table and ids (the GPU path reports them without a host sync)
        if table.size and (table.min() < 0 or table.max() >= E):
            raise ValueError(f"tid2eid entries must lie in [0, E={E}), found [{table.min()}, {table.max()}]")
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise ValueError(f"token_ids must lie in [0, vocab={table.shape[0]}), found [{ids.min()}, {ids.max()}]")
        if errors is not None:
            raise TypeError("errors= is a device counter for GPU inputs; the reference raises instead")
    elif errors is not None:
        errors = frame.convert(errors, "errors")
        if errors.dtype != np.int32 or errors.size != 1:
            raise TypeError(f"errors must be an int32 array of one element, got {dtype_name(errors.dtype)} {tuple(errors.shape)}")
    out_w, out_i = (None, None) if out is None else _split_out(out)
    if out_i is not None:
        out_i = frame.convert(out_i, "out[1] (indices)")
    idt = _resolve_index_dtype(index_dtype, out_i, E)
    problem = RouterHashProblem(frame.backend, _bucket_tokens(T), E, k, dtype_name(x.dtype), dtype_name(idt), sf)
    if not allocate:
        return RouterHashArgs(None, table, ids, sf, scale, None, None, errors, problem, frame), ()
    x2 = frame.xp.ascontiguousarray(x).reshape(T, E)
    w_full, w2, i_full, i2 = _outputs(frame, out_w, out_i, lead, k, idt)
    args = RouterHashArgs(x2, frame.xp.ascontiguousarray(table), frame.xp.ascontiguousarray(ids).reshape(T),
                          sf, scale, w2, i2, errors, problem, frame)
    return args, (w_full, i_full)


def router_hash(logits, tid2eid, token_ids, *, score_function: str = "sqrtsoftplus",
                scaling_factor: Optional[float] = None, index_dtype=None, out=None, errors=None,
                variant: Optional[str] = None):
    """Hash routing (DeepSeek-V4 layers 0-2): experts from a token-id table, weights from scores.

    indices = tid2eid[token_ids]; s = score_function(logits) at those experts (float32);
    weights = s / (sum s + 1e-20) over the k entries if k > 1, else s; times scaling.  No bias.

    Args:
        logits: ``[..., E]`` float32/float16/bfloat16.
        tid2eid: int32 ``[vocab, k]`` table.
        token_ids: int32/int64 of shape ``[...]`` (the leading dims of logits).
        index_dtype, out: as in :func:`router_topk` (strided / narrow index outputs allowed).
        errors: GPU only: an int32 device array of one element; the kernel adds the number of
            out-of-range token ids or table entries it met (no host synchronisation).

    Out-of-range ids or entries: the reference (numpy) raises ``ValueError``.  On the GPU nothing
    is read or written out of bounds; a bad entry gets index 0 and a NaN score, so that token's
    weights are NaN, and ``errors`` counts it.

    Returns ``(weights, indices)``, ``[..., k]`` each, in table order.
    """
    args, (w_full, i_full) = _prepare_hash(logits, tid2eid, token_ids, score_function, scaling_factor,
                                           index_dtype, out, errors)
    v = dispatch.select(HASH_OP, args.problem, variant)
    if args.logits.shape[0] > 0:
        args.frame.run(v.fn, args)
    return args.frame.give_back(w_full), args.frame.give_back(i_full)


def explain_router_hash(logits, tid2eid, token_ids, *, score_function="sqrtsoftplus", scaling_factor=None,
                        index_dtype=None, out=None, errors=None, variant=None) -> dispatch.Decision:
    args, _ = _prepare_hash(logits, tid2eid, token_ids, score_function, scaling_factor, index_dtype, out,
                            errors, allocate=False)
    return dispatch.decide(HASH_OP, args.problem, variant)


def reference_router_hash(logits, tid2eid, token_ids, score_function, scaling_factor):
    x = np.asarray(logits).astype(np.float32)
    idx = np.asarray(tid2eid)[np.asarray(token_ids)].astype(np.int64)
    w = score(np.take_along_axis(x, idx, axis=1), score_function)
    with np.errstate(invalid="ignore"):
        if idx.shape[1] > 1:
            w = w / (w.sum(axis=1, keepdims=True, dtype=np.float32) + EPS)
        w = (w * np.float32(scaling_factor)).astype(np.float32)
    return w, idx


def _reference_hash(a: RouterHashArgs) -> None:
    w, idx = reference_router_hash(a.logits, a.tid2eid, a.token_ids, a.score_function, a.scaling_factor)
    a.weights[...] = w
    a.indices[...] = idx


ROUTER_HASH_KERNELS = kernels.register_family(kernels.KernelFamily(
    "router_hash.cu", tuple(f"router_hash_naive<{c}>" for c in _CTYPE.values())))


def _naive_hash(a: RouterHashArgs) -> None:
    T, E = a.logits.shape
    kern = ROUTER_HASH_KERNELS.kernel(f"router_hash_naive<{_CTYPE[a.problem.dtype]}>")
    grid = (T + NAIVE_WARPS_PER_BLOCK - 1) // NAIVE_WARPS_PER_BLOCK
    kern((grid,), (32 * NAIVE_WARPS_PER_BLOCK,),
         (a.logits, a.tid2eid, np.int64(a.tid2eid.shape[0]), a.token_ids, np.int32(a.token_ids.dtype == np.int64),
          np.int64(T), np.int32(E), np.int32(a.problem.topk), np.int32(SCORE_FUNCTIONS[a.score_function]),
          np.float32(a.scaling_factor)) + _output_args(a)
         + (a.errors if a.errors is not None else np.uint64(0),))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", _reference, cost=1.0,
                     description="numpy, float32 arithmetic; the oracle of the GPU tests"))
    register(Variant(OP, "naive", "cuda", _naive, supports=_naive_supports, cost=1.0,
                     description="one warp per token, k rounds of warp arg-max over register-held keys"))
    register(Variant(OP, "radix", "cuda", _radix, supports=_radix_supports, cost=_radix_cost,
                     description="one warp per token, keys in shared memory: radix select of the k-th key "
                                 "(4 passes of 8 bits), ties by index; E up to ~8k"))
    register(Variant(OP, "threshold", "cuda", _threshold, supports=_threshold_supports, cost=_threshold_cost,
                     description="one warp per token; lane-max threshold, candidates selected exactly "
                                 "(fast screening for sqrtsoftplus)"))
    register(Variant(OP, "screened", "cuda", _warp, supports=_screened_supports, cost=_screened_cost,
                     description="one warp per token, compile-time score function, contiguous lanes with "
                                 "vector loads; screened threshold, candidates selected exactly (E <= 512, k <= 32)"))
    register(Variant(OP, "rows", "cuda", _rows, supports=_rows_supports, cost=_rows_cost,
                     description="one or two threads per token: chunk bounds, "
                                 "screened candidates, exact list (sigmoid/sqrtsoftplus, E <= 256, k <= 16; "
                                 "group-limited: groups of 16n experts, k <= 8, k/group_topk <= 2)"))
    register(Variant(OP, "grouped", "cuda", _warp, supports=_grouped_supports, cost=0.7,  # rule above _screened_cost
                     description="group-limited routing in one pass: each group's lanes find its top scores "
                                 "together, then group rounds and exact selection (E <= 512, k <= 32)"))
    register(Variant(HASH_OP, "reference", "numpy", _reference_hash, cost=1.0,
                     description="numpy table lookup; validates ids and table entries"))
    register(Variant(HASH_OP, "naive", "cuda", _naive_hash, cost=1.0,
                     description="one warp per token, one table entry per lane; bad entries counted, never dereferenced"))
