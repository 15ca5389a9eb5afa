"""``topk_rows``: the k largest scores of each row of a matrix (indices, descending, ties to the
lower column, -1 padded), only the first ``lengths[r]`` columns of row r counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import pow2_bucket as bucket
from ...core.arrays import Frame, dtype_name
from ...core.op import Call, define_op
from . import kernels
from .rule import rule

OP = "topk_rows"
MAX_K = kernels.MAX_K
MAX_COLS = 2 ** 31 - 1


def as_count(x, name: str, lo: int, hi: Optional[int] = None) -> int:
    """An int argument (Python or numpy integer, not bool) within [lo, hi]."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    v = int(x)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


@dataclass(frozen=True)
class TopkProblem:
    """What variants' ``supports`` and the rule see: R, C and k rounded up to powers of two, the
    score dtype, whether lengths are given, the device's opt-in shared memory per block."""

    backend: str
    rows_bucket: int
    cols_bucket: int
    k_bucket: int
    dtype: str
    lengths: bool
    smem_per_block: int = 0

    def __str__(self) -> str:
        return (f"backend={self.backend} R<={self.rows_bucket} C<={self.cols_bucket} k<={self.k_bucket} "
                f"{self.dtype}{' +lengths' if self.lengths else ''}")

    @property
    def bucket(self) -> tuple:
        return (self.rows_bucket, self.cols_bucket, self.k_bucket, self.dtype, self.lengths)


@dataclass
class TopkArgs:
    """Validated arguments handed to a variant: ``scores`` ``[R, C]`` (last axis contiguous, rows
    ``row_stride`` elements apart), ``k``, ``lengths`` None or int32 ``[R]`` contiguous, ``out``
    int32 ``[R, k]`` C-contiguous (the variant fills it), ``errors`` None or a device int32 counter."""

    scores: Any
    row_stride: int
    k: int
    lengths: Any
    out: Any
    errors: Any
    problem: TopkProblem
    frame: Frame

    @property
    def rows(self) -> int:
        return int(self.scores.shape[0])

    @property
    def cols(self) -> int:
        return int(self.scores.shape[1])


SCORE_DTYPES = ("float32", "bfloat16", "float16")


def check_scores(frame: Frame, scores, name: str = "scores"):
    """The score matrix and its row stride in elements."""
    a = frame.convert(scores, name) if scores is not frame.array else scores
    if dtype_name(a.dtype) not in SCORE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dtype_name(a.dtype)}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [R, C] matrix, got shape {tuple(a.shape)}")
    R, C = (int(d) for d in a.shape)
    if C > MAX_COLS:
        raise ValueError(f"{name}: C={C} columns is beyond the kernels' int range")
    item = a.itemsize
    if a.size == 0:
        return a, C
    if C > 1 and a.strides[1] != item:
        raise ValueError(f"{name}: each row must be contiguous (strides {a.strides})")
    stride = int(a.strides[0]) // item if R > 1 else C
    if R > 1 and (a.strides[0] % item or stride < C):
        raise ValueError(f"{name}: rows must not overlap (row stride {a.strides[0]} bytes)")
    return a, stride


def check_lengths_arg(frame: Frame, lengths, rows: int, cols: int):
    """lengths as int32 ``[R]`` (int64 is converted), or None; the reference checks the range."""
    if lengths is None:
        return None
    n = frame.convert(lengths, "lengths")
    if n.dtype not in (np.int32, np.int64):
        raise TypeError(f"lengths must be int32 or int64, got {dtype_name(n.dtype)}")
    if tuple(n.shape) != (rows,):
        raise ValueError(f"lengths must have shape [R] = ({rows},), got {tuple(n.shape)}")
    if frame.backend == "numpy":
        from .reference import check_lengths

        check_lengths(n, cols)
        return np.ascontiguousarray(n.astype(np.int32, copy=False))
    # clip before narrowing so an int64 length beyond int32 stays out of range (clamped and counted)
    return frame.xp.ascontiguousarray(frame.xp.clip(n, -1, min(cols + 1, 2 ** 31 - 1)).astype(np.int32))


def check_out(frame: Frame, out, rows: int, k: int):
    a = frame.convert(out, "out")
    if a.dtype != np.int32:
        raise TypeError(f"out must be int32, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != (rows, k):
        raise ValueError(f"out must have shape [R, k] = {(rows, k)}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous (strides {a.strides})")
    if frame.backend == "numpy" and not a.flags.writeable:
        raise ValueError("out is read-only")
    return a


def check_errors(frame: Frame, errors):
    if errors is None:
        return None
    if frame.backend == "numpy":
        raise TypeError("errors= is a device counter for GPU inputs; the reference raises instead")
    e = frame.convert(errors, "errors")
    if e.dtype != np.int32 or e.size != 1:
        raise TypeError(f"errors must be an int32 array of one element, got {dtype_name(e.dtype)} {tuple(e.shape)}")
    return e


def smem_limit(frame: Frame) -> int:
    return kernels.device_facts(frame.device_id)[0] if frame.backend == "cuda" else 0


@define_op(OP, rule=rule, kernels=kernels.FAMILIES)
def topk_rows(scores, k, *, lengths=None, out=None, errors=None, plan_only: bool = False):
    """Indices of the k largest scores of each row, in descending order.

    Order: descending score; NaN ranks below -inf (picked only when no number is left, as in the
    routers; ``torch.topk`` puts NaN first); -0.0 equals +0.0; equal scores go to the lower
    column.  Only the first ``lengths[r]`` columns of row r count; a row with fewer than k of
    them is padded with -1 (so is every row when k > C).

    Args:
        scores: float32, bfloat16 or float16 ``[R, C]``; each row contiguous, rows may be strided
            (e.g. a column slice of a wider buffer).
        k: 1 <= k <= 2048 (an int or numpy integer); k > C is allowed (padding).
        lengths: optional int32 / int64 ``[R]``, each in [0, C].  Out of range: the reference
            raises ``ValueError``; the GPU clamps to [0, C] and adds the row to ``errors``.
        out: optional int32 ``[R, k]`` C-contiguous output.
        errors: GPU only, an int32 device array of one element: the kernels add the number of
            rows whose length was out of range (no host synchronisation).

    Variants: ``reference`` (numpy), ``sort`` (one block per row sorts the whole row in shared
    memory: C <= 8192; the reference's GPU twin), ``radix`` (radix select: 8-bit digit histograms
    over keys staged in shared memory, an ordered compaction, a bitonic sort of the k winners; rows
    longer than one chunk are cut into chunks whose k best are merged by further passes, so many
    blocks share a long row; by default one chunk per row where it fits, else the fewest merge
    levels, then the smallest chunk), ``hist`` (one block per 4096 columns of a row: three rounds
    of global 11/11/10-bit digit histograms find the k-th key, a pass collects the winners, one
    block per row sorts them; scratch ``R * (8 + 2048) * 4 + R * slices * 4 + R * k * 8`` bytes;
    slower than ``radix`` wherever measured, so only the autotuner or ``variant=`` picks it).
    Device scratch of ``radix`` with S chunks per row: ``R * S * k * 8`` bytes (none when a row
    fits one chunk).

    Returns ``out`` (int32 ``[R, k]``).
    """
    frame = Frame(scores, "scores")
    sc, stride = check_scores(frame, frame.array)
    R, C = (int(d) for d in sc.shape)
    k = as_count(k, "k", 1, MAX_K)
    lens = check_lengths_arg(frame, lengths, R, C)
    errs = check_errors(frame, errors)
    o = None if out is None else check_out(frame, out, R, k)
    problem = TopkProblem(frame.backend, bucket(R), bucket(C), bucket(k), dtype_name(sc.dtype), lens is not None,
                          smem_limit(frame))
    if plan_only:
        return Call(problem)
    if o is None:
        o = frame.empty((R, k), np.int32)
    args = TopkArgs(sc, stride, k, lens, o, errs, problem, frame)
    return Call(problem, args, frame, o, skip=R == 0)
