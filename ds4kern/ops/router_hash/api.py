"""``router_hash``: hash-routed layers (DeepSeek-V4 layers 0-2): experts from a token-id table,
weights from the router's scores at those experts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.arrays import Frame, dtype_name
from ...core.op import Call, define_op, reference_or
from ..router.api import _logits, _outputs, _resolve_index_dtype, _scaling, _score_function, _split_out, bucket_tokens
from . import kernels

OP = "router_hash"
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


@define_op(OP, rule=reference_or("naive"), kernels=kernels.FAMILIES)
def router_hash(logits, tid2eid, token_ids, *, score_function: str = "sqrtsoftplus",
                scaling_factor: Optional[float] = None, index_dtype=None, out=None, errors=None,
                plan_only: bool = False):
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
        out_i = frame.convert(out_i, "out[1] (indices)", written=True)
    idt = _resolve_index_dtype(index_dtype, out_i, E)
    problem = RouterHashProblem(frame.backend, bucket_tokens(T), E, k, dtype_name(x.dtype), dtype_name(idt), sf)
    if plan_only:
        return Call(problem)
    x2 = frame.xp.ascontiguousarray(x).reshape(T, E)
    w_full, w2, i_full, i2 = _outputs(frame, out_w, out_i, lead, k, idt)
    args = RouterHashArgs(x2, frame.xp.ascontiguousarray(table), frame.xp.ascontiguousarray(ids).reshape(T),
                          sf, scale, w2, i2, errors, problem, frame)
    return Call(problem, args, frame, (w_full, i_full), skip=T == 0)


