"""``indexer_topk``: DeepSeek-V4's lightning indexer, the logits of every visible compressed key
and the top-k of them per query token.  Semantics: ``shared/spec/sparse_attention.md`` (section
"Lightning indexer")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.arrays import BFLOAT16, Frame, dtype_name
from ...core.op import Call, define_op, private_errors_run
from ..topk.api import MAX_K, as_count, bucket
from . import kernels
from .reference import check_lengths, check_pages
from .rule import rule

OP = "indexer_topk"
HEADS, DIM, PAGE = kernels.HEADS, kernels.DIM, kernels.PAGE
KEY_FORMATS = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8"}
MAX_COLS = 2 ** 31 - 1


@dataclass(frozen=True)
class IndexerProblem:
    """What variants' ``supports`` and the rule see.  ``tokens_bucket`` / ``cols_bucket`` /
    ``k_bucket``: T, C and k rounded up to powers of two; ``key_format`` "bf16" or "fp8"; ``paged``:
    keys in 64-row pages through a block table; ``shared_keys``: T > 1 tokens all read sequence 0
    (prefill); ``logits``: the float32 logits are returned; ``smem_per_block`` / ``cc``: the
    device's opt-in shared memory per block and compute capability (0 on the host)."""

    backend: str
    tokens_bucket: int
    cols_bucket: int
    k_bucket: int
    key_format: str
    paged: bool
    shared_keys: bool
    logits: bool
    smem_per_block: int = 0
    cc: int = 0

    def __str__(self) -> str:
        layout = "paged" if self.paged else "contiguous"
        mapping = "tokens share sequence 0" if self.shared_keys else "one sequence per token"
        extra = " +logits" if self.logits else ""
        return (f"backend={self.backend} T<={self.tokens_bucket} C<={self.cols_bucket} k<={self.k_bucket} "
                f"keys={self.key_format} {layout}, {mapping}{extra}")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.cols_bucket, self.k_bucket, self.key_format, self.paged, self.shared_keys,
                self.logits)


@dataclass
class IndexerArgs:
    """Validated arguments handed to a variant.  ``q`` bf16 ``[T, 64, 128]`` and ``w`` float32
    ``[T, 64]`` C-contiguous; ``keys`` bf16 / uint8 ``[B, C, 128]`` or ``[pages, 64, 128]``
    (C-contiguous on the GPU), ``key_scales`` None or float32 ``[B, C]`` / ``[pages, 64]``,
    ``block_table`` None or int32 ``[B, max_pages]``; ``lengths`` int32 ``[T]`` contiguous (on
    the GPU clamped to [-1, C + 1], so out-of-range values stay out of range for the kernels to
    count); ``per_token``: token t reads sequence t (else sequence 0); ``cols`` = C; the variant
    fills ``out`` (int32 ``[T, k]``) and ``logits`` (None, or float32 ``[T, C]``); ``errors`` None
    or a device int32 ``[1]`` counter."""

    q: Any
    w: Any
    keys: Any
    key_scales: Any
    block_table: Any
    lengths: Any
    k: int
    per_token: bool
    cols: int
    out: Any
    logits: Any
    errors: Any
    problem: IndexerProblem
    frame: Frame

    @property
    def tokens(self) -> int:
        return int(self.q.shape[0])

    @property
    def pages(self) -> int:
        return int(self.keys.shape[0])

    @property
    def max_pages(self) -> int:
        return 0 if self.block_table is None else int(self.block_table.shape[1])


def _key_format(key_format) -> str:
    key = key_format.lower() if isinstance(key_format, str) else None
    if key not in KEY_FORMATS:
        raise ValueError(f"key_format must be 'bf16' or 'fp8', got {key_format!r}")
    return KEY_FORMATS[key]


def _keys(frame, keys, fmt, paged, backend):
    a = frame.convert(keys, "keys")
    want, what = (BFLOAT16, "bfloat16") if fmt == "bf16" else (np.dtype(np.uint8), "uint8 (e4m3 codes)")
    if a.dtype != want:
        hint = ""
        if fmt == "bf16" and a.dtype == np.uint8:
            hint = "; e4m3 codes need key_format='fp8' (with key_scales)"
        elif fmt == "fp8" and a.dtype == BFLOAT16:
            hint = "; bf16 keys need key_format='bf16'"
        raise TypeError(f"keys must be {what} for key_format={fmt!r}, got {dtype_name(a.dtype)}{hint}")
    shape = "[pages, 64, 128] (paged, with block_table)" if paged else "[B, C, 128]"
    if a.ndim != 3 or a.shape[2] != DIM or (paged and a.shape[1] != PAGE):
        raise ValueError(f"keys must have shape {shape}, got {tuple(a.shape)}")
    if backend == "cuda":
        if not a.flags.c_contiguous:
            raise ValueError(f"keys must be C-contiguous on the GPU (strides {a.strides}); the kernels read "
                             "whole rows at fixed offsets")
        if a.size and a.data.ptr % 16:
            raise ValueError(f"keys: the GPU kernels need its data 16-byte aligned, got address {a.data.ptr:#x}")
    return a


def _device_array(frame, x, name, dtype, shape):
    a = frame.convert(x, name)
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(a.shape)}")
    return a


def _device_facts(frame) -> tuple:
    """``(opt-in shared memory per block, compute capability as 10 major + minor)``; zeros on the host."""
    if frame.backend != "cuda":
        return 0, 0
    smem, _ = kernels.device_facts(frame.device_id)
    return smem, kernels.compute_capability(frame.device_id)


@define_op(OP, rule=rule, kernels=kernels.FAMILIES)
def indexer_topk(q_idx, w, keys, k, *, lengths, key_format: str = "bf16", key_scales=None, block_table=None,
                 return_logits: bool = False, out=None, errors=None, plan_only: bool = False):
    """DeepSeek-V4's lightning indexer: per query token, the k key columns of highest score.

    For token t, reading sequence b (b = t when B == T: decode, one query per sequence; b = 0 when
    B == 1: the tokens of one sequence, e.g. a prefill chunk with ``lengths[t] = (pos_t + 1) // 4``),
    and each column c < lengths[t]::

        score[t, c] = sum_h w[t, h] * relu(q_idx[t, h] . key_b[c])                 bf16 keys
        score[t, c] = sum_h w[t, h] * relu(key_scales_b[c] * (q_idx[t, h] . k8_b[c]))  fp8 keys

    The indices are ordered exactly as ``ds4kern.topk_rows(logits, k, lengths=lengths)`` orders
    them: descending score, equal scores to the lower column, NaN lowest, padded with -1 where a
    row has fewer than k columns.

    Args:
        q_idx: bf16 ``[T, 64, 128]`` index queries (H = 64 heads of D = 128, fixed).
        w: float32 ``[T, 64]`` head weights.
        keys: the indexer's compressed keys.  Contiguous: ``[B, C, 128]``, sequence b's columns
            are ``keys[b, :C]``.  Paged (``block_table`` given): ``[pages, 64, 128]``, column c of
            sequence b is row c % 64 of page ``block_table[b, c // 64]`` and C = max_pages * 64.
            bf16 with ``key_format="bf16"``; uint8 e4m3 codes (fn: bias 7, 0x7f / 0xff NaN) with
            ``key_format="fp8"``.  C-contiguous and 16-byte aligned on the GPU.
        k: 1 <= k <= 2048 (k > C is allowed: padding).
        lengths: int32 / int64 ``[T]``, visible columns of each token, in [0, C].
        key_format: "bf16" or "fp8".
        key_scales: fp8 only, float32 ``[B, C]`` (paged: ``[pages, 64]``), one scale per key row.
        block_table: optional int32 ``[B, max_pages]`` of page numbers; only the entries below
            ``ceil(lengths[t] / 64)`` of some token t of the sequence are read (the rest may hold
            anything, e.g. -1).
        return_logits: also return the float32 logits ``[T, C]`` (-inf at columns >= lengths[t]).
        out: optional int32 ``[T, k]`` C-contiguous output for the indices.
        errors: GPU only, an int32 device array of one element.

    Bad input (the GPU never reads out of bounds): lengths outside [0, C] and page numbers
    outside [0, pages) in a read entry make the reference raise ``ValueError`` naming the
    argument.  On the GPU, lengths are clamped to [0, C] and each bad one adds 1 to ``errors``;
    the 64 columns of a bad page get logit -inf (ranked below every finite score: selected only
    where the row has fewer than k columns with another score, in column order), and ``errors``
    counts each (token t, page index j < ceil(lengths[t] / 64)) with a bad entry once.

    Variants: ``reference`` (numpy, float64 logits, then topk_rows' reference), ``naive`` (CUDA
    cores, one thread per key column: the reference's GPU twin), ``mma`` (tensor cores, mma.sync
    bf16 with float32 accumulation; fp8 keys converted to bf16 exactly in shared memory).  Each CUDA
    variant is one logits kernel writing float32 ``[T, C]`` (the returned logits, or device scratch
    of ``T * C * 4`` bytes) followed by ``topk_rows``, chosen by topk_rows' own dispatch.
    Accuracy: GPU logits accumulate in float32, within about 2e-5 of the row's score magnitude
    ``max_c sum_h |w| sum_d |q k|``; columns closer than that may come out in either order.

    Returns the indices (int32 ``[T, k]``), or ``(indices, logits)`` with ``return_logits``.
    """
    frame = Frame(q_idx, "q_idx")
    backend = frame.backend
    qa = frame.array
    if qa.dtype != BFLOAT16:
        raise TypeError(f"q_idx must be bfloat16, got {dtype_name(qa.dtype)}")
    if qa.ndim != 3 or qa.shape[1] != HEADS or qa.shape[2] != DIM:
        raise ValueError(f"q_idx must have shape [T, 64, 128] (H=64 index heads of D=128), got {list(qa.shape)}")
    T = int(qa.shape[0])
    wa = _device_array(frame, w, "w", np.dtype(np.float32), (T, HEADS))
    fmt = _key_format(key_format)
    paged = block_table is not None
    ka = _keys(frame, keys, fmt, paged, backend)
    bt = None
    if paged:
        bt = frame.convert(block_table, "block_table")
        if bt.dtype != np.int32:
            raise TypeError(f"block_table must be int32, got {dtype_name(bt.dtype)}")
        if bt.ndim != 2:
            raise ValueError(f"block_table must have shape [B, max_pages], got {list(bt.shape)}")
        B, C, pages = int(bt.shape[0]), int(bt.shape[1]) * PAGE, int(ka.shape[0])
    else:
        B, C, pages = int(ka.shape[0]), int(ka.shape[1]), int(ka.shape[0])
    if C > MAX_COLS:
        raise ValueError(f"keys: C={C} columns is beyond the kernels' int range")
    if B == T:
        per_token = True
    elif B == 1:
        per_token = False
    else:
        src = "block_table has" if paged else "keys have"
        raise ValueError(f"{src} B={B} sequences but q_idx has T={T} tokens: B must equal T (one query per "
                         f"sequence: keys [T, C, 128]) or be 1 (all tokens read sequence 0: keys [1, C, 128])")
    sc = None
    if fmt == "fp8":
        if key_scales is None:
            raise TypeError("key_scales (float32, one scale per key row) is required with key_format='fp8'")
        sc = _device_array(frame, key_scales, "key_scales", np.dtype(np.float32), ka.shape[:2])
    elif key_scales is not None:
        raise ValueError("key_scales is only for key_format='fp8' (bf16 keys carry no scale)")
    k = as_count(k, "k", 1, MAX_K)
    if lengths is None:
        raise TypeError("lengths (int32 [T], visible columns per token) is required")
    ln = frame.convert(lengths, "lengths")
    if ln.dtype not in (np.int32, np.int64):
        raise TypeError(f"lengths must be int32 or int64, got {dtype_name(ln.dtype)}")
    if tuple(ln.shape) != (T,):
        raise ValueError(f"lengths must have shape [T] = [{T}], got {list(ln.shape)}")
    if not isinstance(return_logits, (bool, np.bool_)):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
    xp = frame.xp
    if backend == "numpy":
        if errors is not None:
            raise TypeError("errors= is a device counter for GPU inputs; the reference raises instead")
        check_lengths(ln, C, paged)
        if paged:
            check_pages(bt, ln, pages)
        lens = np.ascontiguousarray(ln.astype(np.int32))
    else:
        if errors is not None:
            errors = frame.convert(errors, "errors")
            if errors.dtype != np.int32 or errors.size != 1:
                raise TypeError(f"errors must be an int32 array of one element, got {dtype_name(errors.dtype)} "
                                f"{tuple(errors.shape)}")
        lens = xp.ascontiguousarray(xp.clip(ln, -1, min(C + 1, 2 ** 31 - 1)).astype(np.int32))
    o = None
    if out is not None:
        o = _device_array(frame, out, "out", np.dtype(np.int32), (T, k))
        if not o.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous (strides {o.strides})")
        if backend == "numpy" and not o.flags.writeable:
            raise ValueError("out is read-only")
    smem, cc = _device_facts(frame)
    problem = IndexerProblem(backend, bucket(T), bucket(C), bucket(k), fmt, paged, not per_token and T > 1,
                             bool(return_logits), smem, cc)
    if plan_only:
        return Call(problem)
    qc = xp.ascontiguousarray(qa)
    if backend == "cuda" and qc.size and qc.data.ptr % 16:
        raise ValueError(f"q_idx: the GPU kernels need its data 16-byte aligned, got address {qc.data.ptr:#x}")
    if o is None:
        o = frame.empty((T, k), np.int32)
    logits = frame.empty((T, C), np.float32) if return_logits else None
    args = IndexerArgs(qc, xp.ascontiguousarray(wa), ka, None if sc is None else xp.ascontiguousarray(sc),
                       None if bt is None else xp.ascontiguousarray(bt), lens, k, per_token, C, o, logits, errors,
                       problem, frame)
    results = (o, logits) if return_logits else o
    return Call(problem, args, frame, results, skip=T == 0, tune_run=private_errors_run(args))
