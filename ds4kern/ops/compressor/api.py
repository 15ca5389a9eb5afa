"""KV compressor (DeepSeek-V4 CSA ratio 4, HCA ratio 128): ``compress_decode`` and ``compress_prefill``.

Every ``ratio`` tokens become one cache row: per channel, a softmax-weighted pool of the window's
rows (ratio 128: the 128 rows of the window; ratio 4: an overlapped 8-row window made of the
previous window's front ``d`` channels and this window's back ``d`` channels), then RMSNorm, then
interleaved RoPE on the last 64 channels at the window's start position; the row lands in
``cache[b, p // ratio]``.  State per batch row (float32, updated in place): ``kv_state`` and
``score_state`` ``[coff * ratio, coff * d]`` (``coff = 2`` for ratio 4, else 1), initialised to
kv = 0 and score = -inf.  Semantics: ``shared/spec/compressor.md``.

A window whose scores are all -inf pools to zeros (never NaN).  A NaN score or kv value makes
that channel NaN and, through RMSNorm, the whole row; +inf scores are outside the contract.

Variants (``compress_decode``): ``reference`` (numpy, float64 pooling), ``naive`` (CUDA, one
block per batch row), ``grouped`` (CUDA, ``pool_group`` = 2, 4 or 8 batch rows per block, each
with its own accumulators; its default per batch size and the choice between them come from the
measurements in ``bench/compressor/PERFORMANCE.md``; autotune times every setting).  ``compress_prefill``:
``reference`` and ``naive`` (one block per emitted window, then one per batch row for the
state).  All CUDA variants give the same bits, and prefill followed by decode reproduces decode
alone exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ...core.args import int_arg, is_int, number_arg, pow2_bucket
from ...core.arrays import FLOAT_DTYPES, Frame, data_ptr, dtype_name
from ...core.op import Call, define_op, reference_or
from . import kernels
from .kernels import POOL_GROUPS, RATIOS
from .reference import ROPE_DIM

DECODE_OP = "compress_decode"
PREFILL_OP = "compress_prefill"
ROPE_PAIRS = ROPE_DIM // 2


def coff_of(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def state_shape(batch: int, ratio: int, dim: int) -> tuple:
    """Shape of ``kv_state`` / ``score_state``: ``[batch, coff * ratio, coff * dim]``."""
    c = coff_of(ratio)
    return (batch, c * ratio, c * dim)


def init_state(batch: int, ratio: int, dim: int, xp=np):
    """Fresh ``(kv_state, score_state)``: kv = 0, score = -inf (float32, numpy or CuPy via ``xp``)."""
    batch, dim = int_arg("batch", batch, lo=0), int_arg("dim", dim, lo=1)
    if not is_int(ratio) or ratio not in RATIOS:
        raise ValueError(f"ratio must be 4 (CSA) or 128 (HCA), got {ratio!r}")
    shape = state_shape(batch, int(ratio), dim)
    return xp.zeros(shape, np.float32), xp.full(shape, -np.inf, np.float32)


@dataclass(frozen=True)
class CompressProblem:
    backend: str
    ratio: int
    dim: int
    batch_bucket: int
    dtype: str        # kv / score
    cache_dtype: str
    tokens_bucket: int = 1  # prefill: tokens per row (bucket); decode: 1

    def __str__(self) -> str:
        s = f"backend={self.backend} ratio={self.ratio} d={self.dim} B<={self.batch_bucket}"
        if self.tokens_bucket > 1:
            s += f" S<={self.tokens_bucket}"
        return s + f" {self.dtype} -> cache {self.cache_dtype}"

    @property
    def bucket(self) -> tuple:
        return (self.ratio, self.dim, self.batch_bucket, self.tokens_bucket, self.dtype, self.cache_dtype)


@dataclass
class CompressArgs:
    """Validated arguments handed to a variant.  Decode: ``kv``/``score`` ``[B, W]``,
    ``positions`` ``[B]``.  Prefill: ``kv``/``score`` ``[B, S, W]``, ``start`` an int or ``[B]``
    array.  ``W = coff * d``.  State, cache and every table contiguous."""

    kv: Any
    score: Any
    ape: Any
    norm_w: Any
    positions: Any      # decode: [B] int32/int64; prefill: [B] start array or None
    start: int          # prefill: the scalar start when positions is None
    rope_cos: Any
    rope_sin: Any
    kv_state: Any
    score_state: Any
    cache: Any
    ratio: int
    eps: float
    errors: Any
    problem: CompressProblem
    frame: Frame

    @property
    def dim(self) -> int:
        return int(self.norm_w.shape[0])


def _float_array(frame, x, name, shape=None, dtype=None, dtypes=FLOAT_DTYPES, contiguous=False):
    a = frame.convert(x, name, written=contiguous)  # (contiguous: updated in place)
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
    if dtype is None and a.dtype not in dtypes:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype_name(a.dtype)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} is updated in place and must be C-contiguous (strides {a.strides})")
    return a


def _prepare(op, kv, score, ape, norm_w, where, rope_cos, rope_sin, kv_state, score_state, cache, ratio, eps,
             errors, allocate=True):
    prefill = op == PREFILL_OP
    frame = Frame(kv, "kv")
    if not is_int(ratio) or ratio not in RATIOS:  # 4.0 is refused: an int, like every count
        raise ValueError(f"ratio must be 4 (CSA) or 128 (HCA), got {ratio!r}")
    ratio = int(ratio)
    c = coff_of(ratio)
    x = _float_array(frame, frame.array, "kv")
    want_nd = 3 if prefill else 2
    if x.ndim != want_nd:
        raise ValueError(f"kv must have shape {'[B, S, coff*d]' if prefill else '[B, coff*d]'}, got {tuple(x.shape)}")
    w = _float_array(frame, norm_w, "norm_w", dtype=np.dtype(np.float32))
    if w.ndim != 1 or w.shape[0] < ROPE_DIM or w.shape[0] % 2:
        raise ValueError(f"norm_w must have shape [d] with d even and >= {ROPE_DIM} (RoPE takes the last "
                         f"{ROPE_DIM} channels), got {tuple(w.shape)}")
    d = int(w.shape[0])
    W = c * d
    if x.shape[-1] != W:
        raise ValueError(f"kv must have {W} = {c} * d channels for ratio {ratio} and d={d} (from norm_w), "
                         f"got shape {tuple(x.shape)}")
    B = int(x.shape[0])
    S = int(x.shape[1]) if prefill else 1
    sc = _float_array(frame, score, "score")
    if sc.dtype != x.dtype:
        raise TypeError(f"score must have kv's dtype {dtype_name(x.dtype)}, got {dtype_name(sc.dtype)}")
    if tuple(sc.shape) != tuple(x.shape):
        raise ValueError(f"score must have kv's shape {tuple(x.shape)}, got {tuple(sc.shape)}")
    f32 = np.dtype(np.float32)
    ap = _float_array(frame, ape, "ape", shape=(ratio, W), dtype=f32)
    cs = _float_array(frame, rope_cos, "rope_cos", dtype=f32)
    if cs.ndim != 2 or cs.shape[1] != ROPE_PAIRS or cs.shape[0] < 1:
        raise ValueError(f"rope_cos must have shape [max_pos, {ROPE_PAIRS}] with max_pos >= 1, got {tuple(cs.shape)}")
    sn = _float_array(frame, rope_sin, "rope_sin", shape=cs.shape, dtype=f32)
    ks = _float_array(frame, kv_state, "kv_state", shape=state_shape(B, ratio, d), dtype=f32, contiguous=True)
    ss = _float_array(frame, score_state, "score_state", shape=state_shape(B, ratio, d), dtype=f32, contiguous=True)
    ca = _float_array(frame, cache, "cache", contiguous=True)
    if ca.ndim != 3 or ca.shape[0] != B or ca.shape[2] != d:
        raise ValueError(f"cache must have shape [B={B}, rows, d={d}], got {tuple(ca.shape)}")
    if ca.dtype not in (f32, x.dtype):
        raise TypeError(f"cache must be float32 or kv's dtype {dtype_name(x.dtype)}, got {dtype_name(ca.dtype)}")
    eps = number_arg("eps", eps, positive=True)
    _no_alias(ks, ss, ca)  # (the reference would update one buffer twice, the kernels race)
    start = 0
    if prefill:
        if is_int(where):
            start, pos = int_arg("start", where, lo=0), None
        else:
            pos = _positions(frame, where, "start", B)
    else:
        pos = _positions(frame, where, "positions", B)
    if frame.backend == "numpy":
        if errors is not None:
            raise TypeError("errors= is a device counter for GPU inputs; the reference raises instead")
        _check_positions_host(pos if pos is not None else np.full(B, start, np.int64), S, ratio, ca.shape[1],
                              cs.shape[0], "start" if prefill else "positions", prefill)
    elif errors is not None:
        errors = frame.convert(errors, "errors")
        if errors.dtype != np.int32 or errors.size != 1:
            raise TypeError(f"errors must be an int32 array of one element, got {dtype_name(errors.dtype)} "
                            f"{tuple(errors.shape)}")
    problem = CompressProblem(frame.backend, ratio, d, pow2_bucket(B), dtype_name(x.dtype), dtype_name(ca.dtype),
                              pow2_bucket(S) if prefill else 1)
    xp = frame.xp
    args = CompressArgs(xp.ascontiguousarray(x), xp.ascontiguousarray(sc), xp.ascontiguousarray(ap),
                        xp.ascontiguousarray(w), pos, start, xp.ascontiguousarray(cs), xp.ascontiguousarray(sn),
                        ks, ss, ca, ratio, float(eps), errors, problem, frame)
    if frame.backend == "cuda" and allocate:
        _check_alignment(args)
    return args


def _positions(frame, where, name, B):
    p = frame.convert(where, name)
    if p.dtype not in (np.int32, np.int64):
        raise TypeError(f"{name} must be int32 or int64, got {dtype_name(p.dtype)}")
    if tuple(p.shape) != (B,):
        raise ValueError(f"{name} must have shape [B] = ({B},), got {tuple(p.shape)}")
    return frame.xp.ascontiguousarray(p)


def _check_positions_host(pos, S, ratio, cache_rows, max_pos, name, prefill):
    """The reference's checks (the GPU skips such rows and counts them in ``errors``, without a
    host sync): positions >= 0, the cache row ``p // ratio`` of every position exists, and every
    emitted row's RoPE position ``p + 1 - ratio`` lies in the table."""
    p = np.asarray(pos, dtype=np.int64)
    if p.size == 0 or S == 0:
        return
    if p.min() < 0:
        raise ValueError(f"{name} must be >= 0, found {p.min()}")
    top = p + S - 1  # the last position of each row
    if (top // ratio).max() >= cache_rows:
        raise ValueError(f"{name}: cache row {int((top // ratio).max())} (position {int(top.max())} // {ratio}) is "
                         f"beyond the cache's {cache_rows} rows")
    last = ((p + S) // ratio) * ratio - 1  # the last emitting position of each row
    emits = last >= p
    if emits.any() and (last[emits] + 1 - ratio).max() >= max_pos:
        raise ValueError(f"{name}: RoPE position {int((last[emits] + 1 - ratio).max())} is beyond the table's "
                         f"{max_pos} rows")


def _no_alias(*arrays):
    """The in-place buffers (C-contiguous: each spans its nbytes) must not share memory."""
    spans = sorted((data_ptr(a), data_ptr(a) + a.nbytes, n) for a, n in zip(arrays, ("kv_state", "score_state", "cache"))
                   if a.nbytes)
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{n0} and {n1} overlap in memory; each must be its own buffer")


def _check_alignment(a: CompressArgs):
    for name in ("kv", "score", "ape", "norm_w", "rope_cos", "rope_sin", "kv_state", "score_state", "cache"):
        arr = getattr(a, name)
        need = 4 * arr.itemsize  # 4-channel vector accesses
        if arr.size and arr.data.ptr % need:
            raise ValueError(f"{name}: the GPU kernels need its data {need}-byte aligned (4-channel vector "
                             f"accesses); got address {arr.data.ptr:#x} (a sliced view?)")


# ---------------------------------------------------------------------------------------
# public functions


def _scratch_run(a: CompressArgs):
    """``run(variant)`` for autotune: the in-place buffers are copied once, so timing the
    candidates never touches the caller's state or cache.  Called inside ``frame.running()``, it
    launches on the current stream (which the timer may capture)."""
    holder = {}

    def run(var):
        if "args" not in holder:
            xp = a.frame.xp
            holder["args"] = replace(a, kv_state=a.kv_state.copy(), score_state=a.score_state.copy(),
                                     cache=a.cache.copy(), errors=None if a.errors is None else xp.zeros_like(a.errors))
        var.fn(holder["args"])

    return run


def _config(pool_group):
    """(variant, setting) that ``pool_group`` asks for: 1 is naive, 2/4/8 the grouped variant."""
    if pool_group is None:
        return None, None
    if not is_int(pool_group) or pool_group not in (1,) + POOL_GROUPS:
        raise ValueError(f"pool_group must be 1, 2, 4 or 8, got {pool_group!r}")
    if pool_group == 1:
        return "naive", None
    return "grouped", {"pool_group": int(pool_group)}


def _call(a: CompressArgs, plan_only: bool, variant=None, config=None, cache=None) -> Call:
    """``cache``: the caller's own cache object, returned as it is (the same object, torch
    tensors included), as the functions document."""
    if plan_only:
        return Call(a.problem, variant=variant, config=config)  # (explain does not check contradictions)
    empty = a.kv.shape[0] == 0 or (a.kv.ndim == 3 and a.kv.shape[1] == 0)
    forced = "" if variant is None else f"pool_group={(config or {}).get('pool_group', 1)}"
    return Call(a.problem, a, a.frame, a.cache if cache is None else cache, skip=empty, variant=variant, config=config,
                forced_by=forced, tune_run=_scratch_run(a), give_back=False)


@define_op(DECODE_OP, rule=reference_or("naive"), kernels=(kernels.DECODE,))
def compress_decode(kv, score, ape, norm_w, positions, rope_cos, rope_sin, kv_state, score_state, cache, *,
                    ratio: int, eps: float = 1e-6, errors=None, pool_group: Optional[int] = None,
                    plan_only: bool = False):
    """One decode step of the KV compressor for a batch whose rows sit at different positions.

    Each batch row b writes its token into its state (row ``ratio + p % ratio`` for ratio 4,
    ``p % ratio`` for 128) and, when ``(p + 1) % ratio == 0``, pools its window into
    ``cache[b, p // ratio]`` (RMSNorm, RoPE at position ``p + 1 - ratio``).  One launch on the GPU.

    Args:
        kv, score: ``[B, coff * d]`` float32 / float16 / bfloat16 (the token's two projections;
            ``coff = 2`` for ratio 4, else 1).
        ape: float32 ``[ratio, coff * d]`` position bias added to the score.
        norm_w: float32 ``[d]`` RMSNorm weight (d >= 64, even; the GPU kernels take 128 and 512).
        positions: int32 / int64 ``[B]`` the token's position per batch row.
        rope_cos, rope_sin: float32 ``[max_pos, 32]`` (see :func:`ds4kern.rope_table`).
        kv_state, score_state: float32 ``[B, coff * ratio, coff * d]``, C-contiguous, updated in
            place (start from :func:`init_state`: kv 0, score -inf).
        cache: ``[B, rows, d]`` float32 or kv's dtype, C-contiguous; row ``p // ratio`` is written.
        ratio: 4 (CSA) or 128 (HCA).
        eps: RMSNorm epsilon.
        errors: GPU only: an int32 device array of one element; the kernel adds the number of
            batch rows it skipped (position < 0, cache row ``p // ratio`` beyond ``rows`` —
            checked for every row, emitting or not —, RoPE position of an emitted row beyond
            ``max_pos``), untouched in state and cache.  The reference raises ``ValueError``.
        pool_group: batch rows per block of the grouped variant (2, 4, 8; 1 means naive).
        variant: ``"naive"``, ``"grouped"``, ``"reference"`` (default: the dispatcher).

    Returns ``cache`` (the same object).
    """
    variant, config = _config(pool_group)
    a = _prepare(DECODE_OP, kv, score, ape, norm_w, positions, rope_cos, rope_sin, kv_state, score_state, cache,
                 ratio, eps, errors, allocate=not plan_only)
    return _call(a, plan_only, variant, config, cache)


@define_op(PREFILL_OP, rule=reference_or("naive"), kernels=(kernels.PREFILL,))
def compress_prefill(kv, score, ape, norm_w, start, rope_cos, rope_sin, kv_state, score_state, cache, *,
                     ratio: int, eps: float = 1e-6, errors=None, plan_only: bool = False):
    """A whole run of S tokens per batch row at once: every cache row it completes, and the state
    that decode steps over the same tokens would leave (bit for bit, on the GPU too).

    Args:
        kv, score: ``[B, S, coff * d]`` (token t of row b sits at position ``start[b] + t``).
        start: int >= 0, or int32 / int64 ``[B]``: each row's first position.  The state must be
            the state after decoding positions ``< start`` (fresh for ``start = 0``).
        The rest as in :func:`compress_decode` (``errors`` counts skipped batch rows).

    Two launches on the GPU (pool every completed window, then update the state).
    Returns ``cache``.
    """
    a = _prepare(PREFILL_OP, kv, score, ape, norm_w, start, rope_cos, rope_sin, kv_state, score_state, cache,
                 ratio, eps, errors, allocate=not plan_only)
    return _call(a, plan_only, cache=cache)
