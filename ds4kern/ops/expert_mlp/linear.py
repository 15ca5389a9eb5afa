"""``grouped_linear``: rows grouped by expert times each expert's matrix (``out[r] = x[r] @ w[e].T``
for ``offsets[e] <= r < offsets[e + 1]``): expert_mlp's down projection on its own.  With one
group it is a dense linear layer on tensor cores that CUDA graphs can capture (CuPy refuses cuBLAS
calls during a capture); with G groups, a grouped projection such as DeepSeek-V4's ``wo_a``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import pow2_bucket
from ...core.arrays import BFLOAT16, Frame, dtype_name
from ...core.hookspecs import hookimpl
from ...core.launch import MAX_GRID, allow_smem
from ...core.launch import grid as _core_grid
from ...core.op import Call, define_op
from ...core.registry import Variant
from . import kernels as K
from .api import F32, _aligned, _device_facts, _out_dtype, _weights, offsets_arg, rows_arg

OP = "grouped_linear"
MIN_CC = 80


@dataclass(frozen=True)
class LinearProblem:
    """``rows_bucket``: N rounded up to a power of two; ``groups``, ``out_features``,
    ``in_features``: E, O, I of ``w [E, O, I]``; ``out_dtype``; ``aligned16``: x, w and out start on
    16-byte boundaries; ``w_contiguous``; the device's facts (zeros on the host)."""

    backend: str
    rows_bucket: int
    groups: int
    out_features: int
    in_features: int
    out_dtype: str
    aligned16: bool
    w_contiguous: bool
    smem_per_block: int = 0
    sm_count: int = 0
    cc: int = 0

    def __str__(self) -> str:
        return (f"backend={self.backend} N<={self.rows_bucket} E={self.groups} O={self.out_features} "
                f"I={self.in_features} out {self.out_dtype}{'' if self.w_contiguous else ', strided w'}"
                f"{'' if self.aligned16 else ', not 16-byte aligned'}")

    @property
    def bucket(self) -> tuple:
        return (self.rows_bucket, self.groups, self.out_features, self.in_features, self.out_dtype, self.aligned16,
                self.w_contiguous)


@dataclass
class LinearArgs:
    """``x`` bf16 ``[N, I]`` C-contiguous, ``offsets`` int32 ``[E + 1]``, ``w`` bf16 ``[E, O, I]``,
    ``out`` ``[N, O]`` C-contiguous (rows below offsets[E] filled)."""

    x: Any
    offsets: Any
    w: Any
    out: Any
    problem: LinearProblem
    frame: Frame


def _rule(p, ok: frozenset) -> tuple:
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    if "split" in ok and "grouped" in ok:
        tn = _tn(p)
        items = K.item_bound(p.rows_bucket, p.groups, tn, K.down_tiles(p.out_features)) if tn else 0
        if items < max(p.sm_count, 1) and p.in_features >= 1024:
            return "split", (f"{items} blocks would leave multiprocessors idle; I={p.in_features} split in "
                             f"{_splits(p)} (provisional: not yet measured)")
    if "grouped" in ok:
        return "grouped", "tensor cores, one launch, no host synchronisation (CUDA graphs can capture it)"
    return ("naive", "grouped cannot run it") if "naive" in ok else (sorted(ok)[0], "the first that can")


@define_op(OP, rule=_rule, kernels=K.FAMILIES)
def grouped_linear(x, offsets, w, *, out_dtype=None, out=None, plan_only: bool = False):
    """``out[r] = x[r] @ w[e].T`` (float32 accumulation of bf16 products) for the rows
    ``offsets[e] <= r < offsets[e + 1]`` of each group e; rows from ``offsets[E]`` on are left
    unwritten (zeros on the host with ``out=None``).

    Args:
        x: bf16 ``[N, I]`` (a non-contiguous x is copied).
        offsets: int32 / int64 ``[E + 1]`` on x's device; host arrays are checked, device arrays
            are clamped to [0, N] (as ``expert_mlp``).
        w: bf16 ``[E, O, I]`` (torch Linear layout per group).
        out_dtype: "bfloat16" (default) or "float32"; out: optional ``[N, O]`` C-contiguous.

    Variants: ``reference`` (numpy float32), ``naive`` (a float32 cuBLAS GEMM per group through
    CuPy; copies offsets to the host), ``grouped`` (expert_mlp's down kernel: mma.sync bf16, one
    launch, no host synchronisation; O and I multiples of 64, E <= 1024, contiguous 16-byte
    aligned operands, sm_80+), ``split`` (the same over S parts of I at once, float32 partials
    added in a fixed order by a second launch: for projections whose few 64-wide output tiles
    would leave the device idle).
    """
    frame = Frame(x, "x")
    xa, N, I = rows_arg(frame, "I")
    wa = _weights(frame, w, "w", None, "[E, O, I]", None)
    E, O = int(wa.shape[0]), int(wa.shape[1])
    if E < 1 or O < 1 or wa.shape[2] != I:
        raise ValueError(f"w must have shape [E, O, I] with E, O >= 1 and I = {I} (x's), got {list(wa.shape)}")
    offs = offsets_arg(frame, offsets, E, N, "groups of w")
    odt = _out_dtype(out_dtype, out)
    o = None
    if out is not None:
        o = frame.convert(out, "out", written=True)
        odt = o.dtype if odt is None else odt
        if o.dtype != odt or o.dtype not in (BFLOAT16, F32):
            raise TypeError(f"out must be {dtype_name(odt)} (bfloat16 or float32), got {dtype_name(o.dtype)}")
        if tuple(o.shape) != (N, O) or not o.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous of shape [N, O] = [{N}, {O}], got {list(o.shape)}")
    xp = frame.xp
    xc = xa if xa.flags.c_contiguous else xp.ascontiguousarray(xa)
    smem, sms, cc = _device_facts(frame)
    problem = LinearProblem(frame.backend, pow2_bucket(N), E, O, I, dtype_name(odt),
                            frame.backend != "cuda" or _aligned((xc, wa, o)), bool(wa.flags.c_contiguous),
                            smem, sms, cc)
    if plan_only:
        return Call(problem)
    if o is None:
        o = frame.empty((N, O), odt) if frame.backend == "cuda" else np.zeros((N, O), odt)
    return Call(problem, LinearArgs(xc, offs, wa, o, problem, frame), frame, o, skip=N == 0)


_ROWS_CACHE: dict = {}


def grouped_rows(xp, n_rows: int, groups: int):
    """Offsets ``[0, n, 2n, ..., G n]`` (int32, on the device without a host copy) of G groups of n
    rows each.  On the GPU kept per (device, n, G) once made outside a CUDA-graph capture (never
    written again), so a step's projections do not remake them call after call."""
    if xp is np:
        return np.arange(groups + 1, dtype=np.int32) * np.int32(n_rows)
    dev = xp.cuda.Device().id
    key = (dev, int(n_rows), int(groups))
    hit = _ROWS_CACHE.get(key)
    if hit is not None:
        return hit
    made = xp.arange(groups + 1, dtype=np.int32) * np.int32(n_rows)
    try:
        capturing = bool(xp.cuda.get_current_stream().is_capturing())
    except Exception:
        capturing = True  # unknown: do not keep an array a capture may not have written yet
    if not capturing and len(_ROWS_CACHE) < 4096:
        xp.cuda.get_current_stream().synchronize()  # once per key: later users on other streams see it written
        _ROWS_CACHE[key] = made
    return made


# -- variants ---------------------------------------------------------------------------------


def _reference(a: LinearArgs) -> None:
    o = np.asarray(a.offsets).astype(np.int64)
    for e in range(len(o) - 1):
        lo, hi = int(o[e]), int(o[e + 1])
        if hi > lo:
            a.out[lo:hi] = (a.x[lo:hi].astype(np.float32) @ a.w[e].astype(np.float32).T).astype(a.out.dtype)


def _naive(a: LinearArgs) -> None:
    xp = a.frame.xp
    N = int(a.x.shape[0])
    offs = np.clip(xp.asnumpy(a.offsets).astype(np.int64), 0, N)
    for e in range(len(offs) - 1):
        lo, hi = int(offs[e]), int(offs[e + 1])
        if hi > lo:
            y = a.x[lo:hi].astype(np.float32) @ a.w[e].astype(np.float32).T
            a.out[lo:hi] = y.astype(a.out.dtype)


def _tn(p: LinearProblem) -> Optional[int]:
    fits = [t for t in K.TOKEN_GROUPS if K.grouped_block_smem(t) <= p.smem_per_block
            and K.item_bound(p.rows_bucket, p.groups, t, K.down_tiles(p.out_features)) <= MAX_GRID]
    if not fits:
        return None
    tn = K.tokens_per_group(p.rows_bucket, p.groups, K.down_tiles(p.out_features), p.sm_count)
    return tn if tn in fits else fits[0]


def _grouped_supports(p: LinearProblem) -> Optional[str]:
    if p.cc and p.cc < MIN_CC:
        return f"needs sm_80 or newer (mma.sync bf16, cp.async); the device is sm_{p.cc}"
    if p.out_features % K.ALIGN or p.in_features % K.ALIGN:
        return f"O={p.out_features} and I={p.in_features} must be multiples of {K.ALIGN}"
    if p.groups > K.MAX_EXPERTS:
        return f"E={p.groups} groups: the item search handles at most {K.MAX_EXPERTS}"
    if not p.w_contiguous:
        return "w must be C-contiguous (the kernel addresses whole rows from the base)"
    if not p.aligned16:
        return "x, w and out must start on 16-byte boundaries (16-byte copies and stores)"
    if _tn(p) is None:
        return f"no row-group size fits the device ({p.smem_per_block} bytes of shared memory per block) and one launch"
    return None


def _grouped(a: LinearArgs) -> None:
    p = a.problem
    N, E, O, I = int(a.x.shape[0]), p.groups, p.out_features, p.in_features
    tn = _tn(p)
    blocks = K.item_bound(N, E, tn, K.down_tiles(O))
    kern = K.GROUPED.kernel(K.down_name(tn, p.out_dtype == "float32"))
    allow_smem(kern, K.grouped_block_smem(tn))
    # expert_mlp_down(h [N, I], offsets, w [E, D=O, I], E, N, D=O, I, out [N, O])
    kern((_core_grid(blocks, OP, f"{K.down_tiles(O)} tiles x row groups", "N (the rows)"),), (K.THREADS,),
         (a.x, a.offsets, a.w, np.int32(E), np.int32(N), np.int32(O), np.int32(I), a.out),
         shared_mem=K.grouped_smem(tn))


def _splits(p: LinearProblem) -> Optional[int]:
    """k splits of the split variant: the fewest (power of two, I / S a multiple of 64) that give
    the device two blocks per multiprocessor, or the most that fit; None when I allows none."""
    tn = _tn(p)
    if tn is None:
        return None
    ok = [s for s in K.SPLITS if p.in_features % (s * K.ALIGN) == 0]
    if not ok:
        return None
    items = K.item_bound(p.rows_bucket, p.groups, tn, K.down_tiles(p.out_features))
    return next((s for s in ok if items * s >= 2 * max(p.sm_count, 1)), ok[-1])


def _split_supports(p: LinearProblem) -> Optional[str]:
    why = _grouped_supports(p)
    if why is not None:
        return why
    if _splits(p) is None:
        return f"I={p.in_features} has no split into 2+ parts of a multiple of {K.ALIGN} columns"
    return None


def _split(a: LinearArgs) -> None:
    p = a.problem
    N, E, O, I = int(a.x.shape[0]), p.groups, p.out_features, p.in_features
    tn, S = _tn(p), _splits(p)
    blocks = K.item_bound(N, E, tn, K.down_tiles(O))
    part = a.frame.xp.empty((S, N, O), np.float32)
    kern = K.GROUPED.kernel(K.down_splitk_name(tn))
    allow_smem(kern, K.grouped_block_smem(tn))
    kern((_core_grid(blocks, OP, f"{K.down_tiles(O)} tiles x row groups", "N (the rows)"), S), (K.THREADS,),
         (a.x, a.offsets, a.w, np.int32(E), np.int32(N), np.int32(O), np.int32(I), np.int32(I // S), part),
         shared_mem=K.grouped_smem(tn))
    red = K.GROUPED.kernel(K.split_reduce_name(p.out_dtype == "float32"))
    n8 = N * (O // 8)
    red((_core_grid(-(-n8 // K.REDUCE_THREADS), OP, "the split reduction", "N (the rows)"),), (K.REDUCE_THREADS,),
        (part, np.int32(S), np.int32(N), np.int32(O), a.offsets, np.int32(E), a.out))


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", _reference, description="numpy, float32 arithmetic per group"))
    register(Variant(OP, "naive", "cuda", _naive,
                     description="a float32 cuBLAS GEMM per group (CuPy); copies offsets to the host (synchronises)"))
    register(Variant(OP, "grouped", "cuda", _grouped, supports=_grouped_supports,
                     description="expert_mlp's down kernel: mma.sync bf16 with the weights as M, a block per (group, "
                                 "64 output features, row group); one launch, no host synchronisation"))
    register(Variant(OP, "split", "cuda", _split, supports=_split_supports,
                     description="the grouped kernel over S parts of I at once (more blocks for few output tiles), "
                                 "float32 partials added in a fixed order by a second launch; no host synchronisation"))
