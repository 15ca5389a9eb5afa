"""``expert_mlp``: the routed experts' clamped SwiGLU MLPs (DeepSeek-V4) over token rows grouped by
expert, as ``moe_permute`` lays them out (rows ``offsets[e] .. offsets[e + 1] - 1`` belong to
expert e)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.args import number_arg, pow2_bucket
from ...core.arrays import BFLOAT16, Frame, byte_span, data_ptr, dtype_name, same_view
from ...core.op import Call, define_op
from . import kernels
from .reference import check_offsets
from .rule import rule

OP = "expert_mlp"
F32 = np.dtype(np.float32)
OUT_DTYPES = {"bfloat16": BFLOAT16, "bf16": BFLOAT16, "float32": F32}
MAX_ROWS = 2 ** 31 - 1 - 64  # row indices (and a row group past the last row) fit the kernels' int


@dataclass(frozen=True)
class ExpertMlpProblem:
    """What variants' ``supports`` and the rule see.  ``rows_bucket``: N rounded up to a power of
    two; ``experts`` / ``dim`` / ``inter``: E, D, I; ``out_dtype``: "bfloat16" or "float32";
    ``clamp``: the SwiGLU clamp is on; ``aligned16``: x, the three weights and out start on 16-byte
    boundaries; ``weights_contiguous``: the three weight arrays are C-contiguous;
    ``smem_per_block`` / ``sm_count`` / ``cc``: the device's opt-in shared memory per block,
    multiprocessor count and compute capability (zeros on the host)."""

    backend: str
    rows_bucket: int
    experts: int
    dim: int
    inter: int
    out_dtype: str
    clamp: bool
    aligned16: bool
    weights_contiguous: bool
    smem_per_block: int = 0
    sm_count: int = 0
    cc: int = 0

    def __str__(self) -> str:
        layout = ("contiguous" if self.weights_contiguous else "strided") + " weights"
        if not self.aligned16:
            layout += ", not 16-byte aligned"
        return (f"backend={self.backend} N<={self.rows_bucket} E={self.experts} D={self.dim} I={self.inter} "
                f"out {self.out_dtype}{' clamped' if self.clamp else ''}, {layout}")

    @property
    def bucket(self) -> tuple:
        return (self.rows_bucket, self.experts, self.dim, self.inter, self.out_dtype, self.aligned16,
                self.weights_contiguous)


@dataclass
class ExpertMlpArgs:
    """Validated arguments handed to a variant.  ``x`` bf16 ``[N, D]`` C-contiguous; ``offsets``
    int32 ``[E + 1]`` contiguous (host: checked; GPU: as given, int64 clipped to [0, N] and
    narrowed); ``w_gate`` / ``w_up`` bf16 ``[E, I, D]``, ``w_down`` bf16 ``[E, D, I]`` (any
    strides; ``problem.weights_contiguous`` says whether they are C-contiguous); ``limit``: the
    SwiGLU clamp (0.0: none); ``out`` ``[N, D]`` bf16 or float32, C-contiguous (the variant fills
    the rows below offsets[E])."""

    x: Any
    offsets: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    limit: float
    out: Any
    problem: ExpertMlpProblem
    frame: Frame

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def experts(self) -> int:
        return int(self.w_gate.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def inter(self) -> int:
        return int(self.w_gate.shape[1])


def _check_out_overlap(out, inputs) -> None:
    """out overlaps no input, except that it may be x itself (the same view: an update in place,
    safe because every variant has read a row of x before it writes that row of out)."""
    so = byte_span(out)
    if so is None:
        return
    for name, a in inputs:
        s = byte_span(a)
        if s is None or not (so[0] < s[1] and s[0] < so[1]):
            continue
        if name == "x" and same_view(a, out):
            continue
        raise ValueError(f"out overlaps {name} in memory; out must be its own buffer (or exactly x)")


def _weights(frame, w, name: str, E, shape_text: str, dims):
    a = frame.convert(w, name)
    if a.dtype != BFLOAT16:
        raise TypeError(f"{name} must be bfloat16, got {dtype_name(a.dtype)}")
    if a.ndim != 3 or (E is not None and a.shape[0] != E) or (dims is not None and tuple(a.shape[1:]) != dims):
        want = shape_text if dims is None else f"{shape_text} = [{E}, {dims[0]}, {dims[1]}]"
        raise ValueError(f"{name} must have shape {want}, got {list(a.shape)}")
    if any(s % a.itemsize for s in a.strides):
        raise ValueError(f"{name}: strides must be multiples of the item size, got {a.strides}")
    return a


def _out_dtype(out_dtype, out):
    if out_dtype is None:
        return BFLOAT16 if out is None else None
    key = out_dtype.lower() if isinstance(out_dtype, str) else None
    if key is None:
        try:
            key = dtype_name(np.dtype(out_dtype))
        except TypeError:
            key = None
    if key not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {out_dtype!r}")
    return OUT_DTYPES[key]


def _limit(limit) -> float:
    if limit is None:
        return 0.0
    v = number_arg("limit", limit)
    if v < 0:
        raise ValueError(f"limit must be >= 0 (0 or None: no clamp), got {limit!r}")
    return v


def _aligned(arrays) -> bool:
    return all(a is None or a.size == 0 or data_ptr(a) % 16 == 0 for a in arrays)


def rows_arg(frame, what: str) -> tuple:
    """x: bf16 ``[N, width]`` (``what`` names the width, e.g. "D"); returns ``(x, N, width)``."""
    xa = frame.array
    if xa.dtype != BFLOAT16:
        raise TypeError(f"x must be bfloat16, got {dtype_name(xa.dtype)}")
    if xa.ndim != 2 or xa.shape[1] < 1:
        raise ValueError(f"x must have shape [N, {what}] with {what} >= 1, got {list(xa.shape)}")
    N, W = (int(d) for d in xa.shape)
    if N > MAX_ROWS:
        raise ValueError(f"x: N={N} rows is beyond the kernels' int range ({MAX_ROWS})")
    return xa, N, W


def offsets_arg(frame, offsets, E: int, N: int, of_what: str):
    """offsets ``[E + 1]`` int32 / int64 as the variants take them: host arrays checked (errors
    name the entry), device int64 clipped to [0, N] and narrowed, int32 as given."""
    off = frame.convert(offsets, "offsets")
    if off.dtype not in (np.int32, np.int64):
        raise TypeError(f"offsets must be int32 or int64, got {dtype_name(off.dtype)}")
    if tuple(off.shape) != (E + 1,):
        raise ValueError(f"offsets must have shape [E + 1] = [{E + 1}] (E = {E} {of_what}), got {list(off.shape)}")
    xp = frame.xp
    if frame.backend == "numpy":
        check_offsets(off, N)
        return np.ascontiguousarray(off.astype(np.int32))
    if off.dtype == np.int64:
        return xp.ascontiguousarray(xp.clip(off, 0, N).astype(np.int32))
    return xp.ascontiguousarray(off)


def _device_facts(frame) -> tuple:
    """``(opt-in shared memory per block, multiprocessor count, compute capability)``; zeros on the host."""
    if frame.backend != "cuda":
        return 0, 0, 0
    from ..indexer.kernels import compute_capability

    smem, sms = kernels.device_facts(frame.device_id)
    return smem, sms, compute_capability(frame.device_id)


@define_op(OP, rule=rule, kernels=kernels.FAMILIES)
def expert_mlp(x, offsets, w_gate, w_up, w_down, *, limit=10.0, out_dtype=None, out=None, plan_only: bool = False):
    """The routed experts' clamped SwiGLU MLPs over rows grouped by expert.

    For each expert e and each row r in ``offsets[e] <= r < offsets[e + 1]``::

        g = x[r] @ w_gate[e].T;  u = x[r] @ w_up[e].T        float32 accumulation of bf16 products
        g = min(g, limit);  u = clamp(u, -limit, limit)      DeepSeek-V4's swiglu_limit (10.0)
        h = bf16(silu(g) * u)                                float32, rounded to bf16 once
        out[r] = h @ w_down[e].T                             float32 accumulation, stored as out's dtype

    The clamp follows the public DeepSeek-V4 code: the gate from above only, the up projection
    both ways; ``limit=None`` or ``0`` turns it off.  The clamps propagate NaN (as torch.clamp).
    Routing weights are not applied here (``moe_unpermute`` does that when it combines).

    Args:
        x: bf16 ``[N, D]`` rows grouped by expert (a non-contiguous x is copied).
        offsets: int32 (or int64) ``[E + 1]``: offsets[0] = 0, non-decreasing, offsets[E] <= N,
            on the inputs' device.  Rows ``offsets[E] .. N - 1`` are ignored and their output is
            left unwritten (with ``out=None`` their content is undefined on the GPU, zero on the
            host).  Host arrays are checked (``ValueError`` naming the entry); on the GPU they are
            not (a check would synchronise): there each offset is clamped to [0, N] and a
            decreasing pair is an empty expert, so memory stays in bounds, but rows may then be
            left unwritten or computed more than once.
        w_gate, w_up: bf16 ``[E, I, D]`` (out-feature, in-feature, as torch Linear weights).
        w_down: bf16 ``[E, D, I]``.
        limit: the SwiGLU clamp, a finite number >= 0; None or 0: no clamp.
        out_dtype: "bfloat16" (default) or "float32" (also numpy dtypes); by default out's dtype
            when ``out`` is given.
        out: optional ``[N, D]`` C-contiguous output of ``out_dtype``; may be ``x`` itself.

    Variants: ``reference`` (numpy, float32 arithmetic), ``naive`` (per touched expert three
    float32 cuBLAS GEMMs through CuPy, bf16 operands widened exactly; it copies ``offsets`` to the
    host, so it synchronises), ``grouped`` (tensor cores, mma.sync bf16 with float32 accumulation,
    two launches, no synchronisation: gate+up with the SwiGLU fused, writing h into a bf16 ``[N, I]``
    device scratch, then down; needs D and I multiples of 64, E <= 1024, C-contiguous weights and
    16-byte aligned x, weights and out, sm_80+).

    Returns ``out`` (``[N, D]``).
    """
    frame = Frame(x, "x")
    xa, N, D = rows_arg(frame, "D")
    wg = _weights(frame, w_gate, "w_gate", None, "[E, I, D]", None)
    E, I = int(wg.shape[0]), int(wg.shape[1])
    if E < 1 or I < 1 or wg.shape[2] != D:
        raise ValueError(f"w_gate must have shape [E, I, D] with E, I >= 1 and D = {D} (x's), got {list(wg.shape)}")
    wu = _weights(frame, w_up, "w_up", E, "[E, I, D]", (I, D))
    wd = _weights(frame, w_down, "w_down", E, "[E, D, I]", (D, I))
    offs = offsets_arg(frame, offsets, E, N, "experts of w_gate")
    lim = _limit(limit)
    odt = _out_dtype(out_dtype, out)
    o = None
    if out is not None:
        o = frame.convert(out, "out", written=True)
        if odt is None:
            if o.dtype not in (BFLOAT16, F32):
                raise TypeError(f"out must be bfloat16 or float32, got {dtype_name(o.dtype)}")
            odt = o.dtype
        elif o.dtype != odt:
            raise TypeError(f"out must be {dtype_name(odt)} (out_dtype), got {dtype_name(o.dtype)}")
        if tuple(o.shape) != (N, D):
            raise ValueError(f"out must have shape [N, D] = [{N}, {D}], got {list(o.shape)}")
        if not o.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous (strides {o.strides})")
        _check_out_overlap(o, (("x", xa), ("w_gate", wg), ("w_up", wu), ("w_down", wd), ("offsets", offs)))
    xp = frame.xp
    xc = xa if xa.flags.c_contiguous else xp.ascontiguousarray(xa)
    contiguous = all(w.flags.c_contiguous for w in (wg, wu, wd))
    aligned = frame.backend != "cuda" or _aligned((xc, wg, wu, wd, o))
    smem, sms, cc = _device_facts(frame)
    problem = ExpertMlpProblem(frame.backend, pow2_bucket(N), E, D, I, dtype_name(odt), lim > 0, aligned, contiguous,
                               smem, sms, cc)
    if plan_only:
        return Call(problem)
    if o is None:
        o = frame.empty((N, D), odt) if frame.backend == "cuda" else np.zeros((N, D), odt)
    args = ExpertMlpArgs(xc, offs, wg, wu, wd, lim, o, problem, frame)
    return Call(problem, args, frame, o, skip=N == 0)
