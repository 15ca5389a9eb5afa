"""``sparse_attention``: DeepSeek-V4 sparse decode / prefill attention with an attention sink, over
a pool of KV rows (bf16 or FP8), one query token per row.  Semantics: ``shared/spec/sparse_attention.md``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...core.args import pow2_bucket
from ...core.arrays import BFLOAT16, Frame, dtype_name, writable
from ...core.op import Call, define_op, private_errors_run
from . import kernels
from .reference import DIM, FP8_ROW, check_positions, check_slots
from .rule import rule

OP = "sparse_attention"
MAX_HEADS = 128
ROPE_PAIRS = 32
KV_FORMATS = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8"}


@dataclass(frozen=True)
class SparseAttentionProblem:
    """What variants' ``supports`` and the rule see.  ``rows_bucket`` / ``slots_bucket``: N and K
    rounded up to powers of two; ``kv_align``: the largest of 16 / 8 bytes dividing the pool's base
    address and row stride (16 for every accepted bf16 pool, 16 or 8 for FP8 rows of 584 bytes);
    ``smem_per_block``: the device's opt-in shared memory per block (0 on the host)."""

    backend: str
    rows_bucket: int
    heads: int
    slots_bucket: int
    kv_format: str
    rope: bool
    lse: bool
    kv_align: int
    smem_per_block: int = 0

    def __str__(self) -> str:
        extras = "".join((" +inverse RoPE" if self.rope else "", " +lse" if self.lse else ""))
        return (f"backend={self.backend} N<={self.rows_bucket} H={self.heads} K<={self.slots_bucket} "
                f"kv={self.kv_format} (rows {self.kv_align}-byte aligned){extras}")

    @property
    def bucket(self) -> tuple:
        return (self.rows_bucket, self.heads, self.slots_bucket, self.kv_format, self.rope, self.lse, self.kv_align)


@dataclass
class SparseAttentionArgs:
    """Validated arguments handed to a variant.  ``q`` bf16 ``[N, H, 512]`` contiguous; ``kv`` the
    pool (bf16 ``[P, 512]`` or uint8 ``[P, 584]``, last axis contiguous, rows ``kv_stride`` bytes
    apart); ``indices`` int32 ``[N, K]`` contiguous; ``sink`` float32 ``[H]``; ``positions`` None or
    int32 / int64 ``[N]`` with ``rope_cos`` / ``rope_sin`` float32 ``[max_pos, 32]``; the variant
    fills ``out`` (bf16 ``[N, H, 512]`` contiguous) and ``lse`` (None or float32 ``[N, H]``);
    ``errors`` None or a device int32 ``[1]`` counter."""

    q: Any
    kv: Any
    kv_stride: int
    indices: Any
    sink: Any
    scale: float
    positions: Any
    rope_cos: Any
    rope_sin: Any
    out: Any
    lse: Any
    errors: Any
    problem: SparseAttentionProblem
    frame: Frame

    @property
    def rows(self) -> int:
        return int(self.q.shape[0])

    @property
    def heads(self) -> int:
        return int(self.q.shape[1])

    @property
    def slots(self) -> int:
        return int(self.indices.shape[1])

    @property
    def pool_rows(self) -> int:
        return int(self.kv.shape[0])


def _kv_format(kv_format) -> str:
    key = kv_format.lower() if isinstance(kv_format, str) else None
    if key not in KV_FORMATS:
        raise ValueError(f"kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    return KV_FORMATS[key]


def _pool(frame, kv, fmt, backend):
    a = frame.convert(kv, "kv")
    want = (BFLOAT16, DIM, "bfloat16 [P, 512]") if fmt == "bf16" else (np.dtype(np.uint8), FP8_ROW, "uint8 [P, 584]")
    if a.ndim != 2:
        raise ValueError(f"kv must be a 2-D pool of rows ({want[2]} for kv_format={fmt!r}), got shape {tuple(a.shape)}")
    if a.dtype != want[0] or a.shape[1] != want[1]:
        hint = ""
        if fmt == "bf16" and a.dtype == np.uint8 and a.shape[1] == FP8_ROW:
            hint = "; an FP8 pool needs kv_format='fp8'"
        elif fmt == "fp8" and a.dtype == BFLOAT16:
            hint = "; a bf16 pool needs kv_format='bf16' (or pack it with pack_kv_fp8)"
        raise ValueError(f"kv must be {want[2]} for kv_format={fmt!r} (row width 512 bf16 / 584 bytes), got "
                         f"{dtype_name(a.dtype)} {tuple(a.shape)}{hint}")
    item = a.itemsize
    if a.strides[1] != item and a.shape[1] > 1:
        raise ValueError(f"kv: each row must be contiguous (strides {a.strides})")
    stride = int(a.strides[0]) if a.shape[0] > 1 else want[1] * item
    if stride < want[1] * item or stride % item:
        raise ValueError(f"kv: rows must not overlap (row stride {stride} bytes, row {want[1] * item} bytes)")
    align = 16
    if backend == "cuda":
        base = int(a.data.ptr)
        row_align = 16 if fmt == "bf16" else 8
        if base % 16 or stride % row_align:
            raise ValueError(f"kv is misaligned: the GPU kernels need a 16-byte aligned base address and rows "
                             f"{row_align} bytes apart multiples (16-byte rows for bf16, 8 for 584-byte FP8 rows); "
                             f"got address {base:#x}, row stride {stride} bytes")
        align = 16 if stride % 16 == 0 else 8
    elif fmt == "fp8" and stride % 16:
        align = 8
    return a, stride, align


def _device_array(frame, x, name, dtype, shape):
    a = frame.convert(x, name)
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


def _scale(scale) -> float:
    if scale is None:
        return DIM ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def _out(frame, x, name, dtype, shape, backend, align=16):
    a = writable(_device_array(frame, x, name, dtype, shape), name)
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {a.strides})")
    if backend == "cuda" and a.size and a.data.ptr % align:
        raise ValueError(f"{name}: the GPU kernels need its data {align}-byte aligned, got address {a.data.ptr:#x}")
    return a


@define_op(OP, rule=rule, kernels=kernels.FAMILIES)
def sparse_attention(q, kv, indices, sink, *, scale: Optional[float] = None, kv_format: str = "bf16",
                     positions=None, rope=None, out=None, lse=None, errors=None, plan_only: bool = False):
    """Sparse attention with an attention sink over a pool of KV rows (K = V, multi-query: one KV
    head shared by all H query heads), one query token per row (decode rows or prefill tokens).

    For query row n and head h, with J = the valid slots of ``indices[n]`` (-1 entries dropped;
    a repeated slot counts as often as it appears) and ``s_j = q[n, h] . kv[j] * scale``::

        m = max_j s_j,  l = sum_j exp(s_j - m)
        o[n, h] = sum_j exp(s_j - m) kv[j] / (l + exp(sink[h] - m))      # the sink: denominator only
        o[n, h, 448:] = inverse RoPE at positions[n]                     # if rope is given

    A row with no valid slot gives zeros (never NaN).  NaN in ``q[n, h]`` makes ``o[n, h]`` (and
    ``lse[n, h]``) NaN and nothing else.

    Args:
        q: bf16 ``[N, H, 512]``, 1 <= H <= 128 (C-contiguous, 16-byte aligned on the GPU; other
            layouts are copied).
        kv: the pool, one row per slot.  ``kv_format="bf16"``: bf16 ``[P, 512]``.  ``"fp8"``: uint8
            ``[P, 584]`` (see :func:`pack_kv_fp8`: 448 e4m3 nope values, 64 bf16 rope values, 7
            ue8m0 scales, 1 pad byte).  Rows may be strided; the last axis contiguous.  GPU: base
            address 16-byte aligned, row stride a multiple of 16 bytes (bf16) / 8 bytes (fp8).
        indices: int32 ``[N, K]``, K >= 1: slot numbers into the pool, -1 = no slot.  Slots >= P or
            < -1 are never read: the reference raises ``ValueError``, the GPU skips them and adds
            them to ``errors``.
        sink: float32 ``[H]``, added (as exp(sink - m)) to each head's softmax denominator only.
        scale: softmax scale, default 512 ** -0.5.
        positions, rope: inverse RoPE of the output's last 64 dims: ``positions`` int32 / int64
            ``[N]``, ``rope = (cos, sin)`` float32 ``[max_pos, 32]`` tables (:func:`ds4kern.rope_table`).
            Interleaved pairs (2i, 2i+1), conjugate of the compressor's rotation:
            ``o0' = o0 cos + o1 sin``, ``o1' = -o0 sin + o1 cos``.  Give both or neither.
            Positions outside the table: the reference raises ``ValueError``; on the GPU the row's
            rope dims become NaN and ``errors`` counts the row once.
        out: optional bf16 ``[N, H, 512]`` C-contiguous output.
        lse: optional float32 ``[N, H]`` output: ``lse = m + log(l)``, natural log, over the
            valid slots only and *without* the sink; -inf for a row with no valid slot.  It lets a
            caller merge attentions over disjoint slot sets: compute each part i with
            ``sink = -inf`` (then ``o_i = sum_j exp(s_j - m) kv[j] / l``), and
            ``o = sum_i exp(lse_i) o_i / (sum_i exp(lse_i) + exp(sink))`` (shift every exponent by
            ``max_i lse_i`` in practice).
        errors: GPU only, an int32 device array of one element; the kernels add the number of bad
            slot entries and bad positions they met (no host synchronisation).

    Variants: ``reference`` (numpy, float64 accumulation), ``naive`` (CUDA cores, one block per
    (row, head)), ``head_batched`` (tensor cores, one block per (row, tile of up to 64 heads); each
    gathered KV tile serves every head of the tile), ``split_k`` (for small N: each row's slots
    spread over several blocks writing float32 partials, then a merge kernel).  split_k's device
    scratch is ``N * H * splits * (512 + 2) * 4`` bytes with ``splits, chunk = split_k_plan(N, H, K,
    kv_tile, multiprocessor count)`` (``kernels.split_k_plan``: about one wave of blocks, whole KV
    tiles per split); the other variants allocate nothing (no ``[N, H, K]`` score matrix anywhere).
    Accuracy (bf16 output against the float64 reference): within bf16 rounding plus the bf16
    rounding of the softmax weights on tensor cores: ``atol = rtol = 1e-2`` for values of order 1.

    Returns ``out`` (``[N, H, 512]`` bf16); ``lse`` is filled when given.
    """
    frame = Frame(q, "q")
    backend = frame.backend
    qa = frame.array
    if qa.dtype != BFLOAT16:
        raise TypeError(f"q must be bfloat16, got {dtype_name(qa.dtype)}")
    if qa.ndim != 3 or qa.shape[2] != DIM:
        raise ValueError(f"q must have shape [N, H, 512], got {tuple(qa.shape)}")
    N, H = int(qa.shape[0]), int(qa.shape[1])
    if not 1 <= H <= MAX_HEADS:
        raise ValueError(f"q has H={H} heads; 1 <= H <= {MAX_HEADS} supported")
    fmt = _kv_format(kv_format)
    pool, stride, align = _pool(frame, kv, fmt, backend)
    idx = frame.convert(indices, "indices")
    if idx.dtype != np.int32:
        raise TypeError(f"indices must be int32, got {dtype_name(idx.dtype)}")
    if idx.ndim != 2 or idx.shape[0] != N:
        raise ValueError(f"indices must have shape [N={N}, K], got {tuple(idx.shape)}")
    K = int(idx.shape[1])
    if K < 1:
        raise ValueError("indices must have K >= 1 slot columns, got K=0")
    if K >= 2 ** 31 // 2:
        raise ValueError(f"indices: K={K} slots per row is beyond the kernels' int range")
    if sink is None:
        raise TypeError("sink must be a float32 array of shape [H] (use -inf entries for no sink)")
    sk = _device_array(frame, sink, "sink", np.dtype(np.float32), (H,))
    sc = _scale(scale)
    if (positions is None) != (rope is None):
        raise ValueError("positions and rope go together: give both (inverse RoPE of the output) or neither")
    pos = cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError("rope must be a (cos, sin) pair of float32 [max_pos, 32] tables")
        cos = frame.convert(rope[0], "rope[0] (cos)")
        if cos.dtype != np.float32:
            raise TypeError(f"rope[0] (cos) must be float32, got {dtype_name(cos.dtype)}")
        if cos.ndim != 2 or cos.shape[1] != ROPE_PAIRS or cos.shape[0] < 1:
            raise ValueError(f"rope[0] (cos) must have shape [max_pos, {ROPE_PAIRS}], got {tuple(cos.shape)}")
        sin = _device_array(frame, rope[1], "rope[1] (sin)", np.dtype(np.float32), cos.shape)
        pos = frame.convert(positions, "positions")
        if pos.dtype not in (np.int32, np.int64):
            raise TypeError(f"positions must be int32 or int64, got {dtype_name(pos.dtype)}")
        if tuple(pos.shape) != (N,):
            raise ValueError(f"positions must have shape [N] = ({N},), got {tuple(pos.shape)}")
    if backend == "numpy":
        if errors is not None:
            raise TypeError("errors= is a device counter for GPU inputs; the reference raises instead")
        check_slots(idx, int(pool.shape[0]))
        if pos is not None:
            check_positions(pos, int(cos.shape[0]))
    elif errors is not None:
        errors = frame.convert(errors, "errors")
        if errors.dtype != np.int32 or errors.size != 1:
            raise TypeError(f"errors must be an int32 array of one element, got {dtype_name(errors.dtype)} "
                            f"{tuple(errors.shape)}")
    o = None if out is None else _out(frame, out, "out", BFLOAT16, (N, H, DIM), backend)
    ls = None if lse is None else _out(frame, lse, "lse", np.dtype(np.float32), (N, H), backend, align=4)
    smem = kernels.device_facts(frame.device_id)[0] if backend == "cuda" else 0
    problem = SparseAttentionProblem(backend, pow2_bucket(N), H, pow2_bucket(K), fmt, pos is not None, ls is not None,
                                     align, smem)
    if plan_only:
        return Call(problem)
    xp = frame.xp
    qc = xp.ascontiguousarray(qa)
    if backend == "cuda" and qc.size and qc.data.ptr % 16:
        raise ValueError(f"q: the GPU kernels need its data 16-byte aligned, got address {qc.data.ptr:#x}")
    if o is None:
        o = frame.empty((N, H, DIM), BFLOAT16)
    args = SparseAttentionArgs(qc, pool, stride, xp.ascontiguousarray(idx), xp.ascontiguousarray(sk), sc,
                               None if pos is None else xp.ascontiguousarray(pos),
                               None if cos is None else xp.ascontiguousarray(cos),
                               None if sin is None else xp.ascontiguousarray(sin), o, ls, errors, problem, frame)
    return Call(problem, args, frame, o, skip=N == 0, tune_run=private_errors_run(args))
