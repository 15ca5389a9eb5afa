"""``moe_permute`` / ``moe_unpermute``: the token dispatch and combine of a Mixture-of-Experts layer
on one GPU.

``moe_permute`` groups the ``T * k`` (token, expert) entries of a router's ``indices [T, k]`` by
expert (a stable counting sort: within an expert, ascending flat index ``t * k + j``) and, given
the tokens' rows ``x [T, D]``, copies each token's row to every row of the permuted matrix it
owns, so each expert's rows are one contiguous block for a grouped GEMM.  ``moe_unpermute`` adds
the experts' output rows back per token, weighted by the routing weights, in the fixed order
j = 0 .. k-1.  Neither synchronises the host on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.args import int_arg, pow2_bucket
from ...core.arrays import BFLOAT16, FLOAT_DTYPES, Frame, byte_span, data_ptr, dtype_name
from ...core.op import Call, define_op, private_errors_run
from ..topk.api import check_errors  # the errors= counter, checked as topk_rows checks it
from . import kernels as K
from .reference import check_indices, check_slots
from .rule import permute_rule, unpermute_rule

PERMUTE_OP = "moe_permute"
UNPERMUTE_OP = "moe_unpermute"
MAX_ENTRIES = 2 ** 30    # T * k: flat indices and permuted rows stay well inside int32
MAX_DIM = 2 ** 30


@dataclass
class MoePermutation:
    """What :func:`moe_permute` returns (arrays of the input's kind: numpy, CuPy or torch).

    counts:   int32 ``[E]``, entries per expert.
    offsets:  int32 ``[E + 1]``, exclusive prefix sums of counts; ``offsets[E]`` = N, the number
              of entries with an expert; expert e owns permuted rows ``offsets[e] .. offsets[e+1]-1``.
    order:    int32 ``[T * k]``: for a permuted row p < N, its flat entry ``t * k + j`` (so the
              token is ``order[p] // k``); -1 for p >= N.
    slot:     int32 ``[T, k]``: the permuted row of entry (t, j); -1 for a skipped entry.
    x_perm:   ``[T * k, D]`` in x's dtype (None without x): row p < N is ``x[order[p] // k]``;
              rows p >= N are left as they were (uninitialised when ds4kern allocated them).
    num_tokens, k, num_experts: T, k and E as Python ints.
    """

    counts: Any
    offsets: Any
    order: Any
    slot: Any
    x_perm: Any
    num_tokens: int
    k: int
    num_experts: int

    @property
    def num_entries(self) -> int:
        """T * k: the rows of ``order`` and of ``x_perm`` (N <= T * k of them are used)."""
        return self.num_tokens * self.k


@dataclass(frozen=True)
class MoePermuteProblem:
    """What moe_permute's variants' ``supports`` and the rule see: T * k rounded up to a power of
    two, E, x's dtype ("" without x), the bytes of one copy of x's rows (16: 16-byte accesses,
    i.e. row bytes, row strides and base addresses of x and x_perm are multiples of 16; else the
    item size; 0 without x), and the device's opt-in shared memory per block."""

    backend: str
    entries_bucket: int
    num_experts: int
    dtype: str
    copy_bytes: int
    smem_per_block: int = 0

    def __str__(self) -> str:
        xs = f" x {self.dtype} ({self.copy_bytes}-byte copies)" if self.dtype else ""
        return f"backend={self.backend} T*k<={self.entries_bucket} E={self.num_experts}{xs}"

    @property
    def bucket(self) -> tuple:
        return (self.entries_bucket, self.num_experts, self.dtype, self.copy_bytes)


@dataclass
class MoePermuteArgs:
    """Validated arguments handed to a moe_permute variant.  ``indices`` int32 ``[T, k]``
    C-contiguous; ``x`` None or ``[T, D]`` with a contiguous last axis, rows ``x_rs`` elements
    apart.  Outputs (the variant fills them): ``counts`` ``[E]``, ``offsets`` ``[E + 1]``,
    ``order`` ``[T * k]``, ``slot`` ``[T, k]`` (int32, C-contiguous), ``x_perm`` ``[T * k, D]``
    (rows ``xp_rs`` elements apart) when x is given.  ``errors``: None or a device int32 counter."""

    indices: Any
    num_experts: int
    counts: Any
    offsets: Any
    order: Any
    slot: Any
    x: Any
    x_rs: int
    x_perm: Any
    xp_rs: int
    errors: Any
    problem: MoePermuteProblem
    frame: Frame

    @property
    def num_tokens(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def dim(self) -> int:
        return 0 if self.x is None else int(self.x.shape[1])


@dataclass(frozen=True)
class MoeUnpermuteProblem:
    """What moe_unpermute's variants see: T rounded up to a power of two, D, k, the dtypes of
    y_perm and out, and ``vec``: 8 when every row access can be 16 bytes (D % 8 == 0, base
    addresses and row strides of y_perm and out multiples of 16 bytes), else 1."""

    backend: str
    tokens_bucket: int
    dim: int
    k: int
    dtype: str
    out_dtype: str
    vec: int

    def __str__(self) -> str:
        return (f"backend={self.backend} T<={self.tokens_bucket} D={self.dim} k={self.k} y {self.dtype} -> "
                f"{self.out_dtype} ({'16-byte' if self.vec == 8 else 'scalar'} accesses)")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.dim, self.k, self.dtype, self.out_dtype, self.vec)


@dataclass
class MoeUnpermuteArgs:
    """Validated arguments handed to a moe_unpermute variant: ``y_perm`` ``[M, D]`` (last axis
    contiguous, rows ``y_rs`` elements apart), ``slot`` int32 and ``weights`` float32 ``[T, k]``
    C-contiguous, ``out`` ``[T, D]`` (rows ``out_rs`` elements apart), ``errors`` None or a device
    int32 counter."""

    y_perm: Any
    y_rs: int
    slot: Any
    weights: Any
    out: Any
    out_rs: int
    errors: Any
    problem: MoeUnpermuteProblem
    frame: Frame

    @property
    def num_tokens(self) -> int:
        return int(self.slot.shape[0])

    @property
    def k(self) -> int:
        return int(self.slot.shape[1])

    @property
    def dim(self) -> int:
        return int(self.y_perm.shape[1])


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_disjoint(outputs, inputs) -> None:
    """No output overlaps another output or an input."""
    spans = [(n, byte_span(a), True) for n, a in outputs] + [(n, byte_span(a), False) for n, a in inputs]
    for i, (n0, s0, o0) in enumerate(spans):
        for n1, s1, o1 in spans[i + 1:]:
            if (o0 or o1) and s0 and s1 and s0[0] < s1[1] and s1[0] < s0[1]:
                raise ValueError(f"{n0} overlaps {n1} in memory; an output must be its own buffer")


def _rows(frame: Frame, x, name: str, written: bool = False):
    """A float ``[R, D]`` matrix with a contiguous last axis and its row stride in elements."""
    a = frame.convert(x, name, written=written) if x is not frame.array else x
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dtype_name(a.dtype)}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, D] matrix, got shape {tuple(a.shape)}")
    R, D = (int(d) for d in a.shape)
    if D > MAX_DIM:
        raise ValueError(f"{name}: D={D} is beyond the kernels' range ({MAX_DIM})")
    item = a.itemsize
    if a.size == 0:
        return a, D
    if D > 1 and a.strides[1] != item:
        raise ValueError(f"{name}: each row must be contiguous (strides {a.strides})")
    if R <= 1:
        return a, D
    st = int(a.strides[0])
    if st < 0 or st % item:
        raise ValueError(f"{name}: the row stride must be a non-negative multiple of the item size "
                         f"(strides {a.strides})")
    if written and st // item < D:
        raise ValueError(f"{name}: its rows overlap one another (strides {a.strides})")
    return a, st // item


def _aligned16(a, rs: int) -> bool:
    """Whether 16-byte accesses reach every row of ``a`` (base address and row stride)."""
    return a is None or a.size == 0 or (data_ptr(a) % 16 == 0 and (a.shape[0] <= 1 or (rs * a.itemsize) % 16 == 0))


def _int32_out(frame: Frame, a, name: str, shape: tuple):
    a = frame.convert(a, name, written=True)
    if a.dtype != np.int32:
        raise TypeError(f"{name} must be int32, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {a.strides})")
    return a


def _float_dtype(v, name: str) -> np.dtype:
    """A float32 / bfloat16 / float16 dtype from a numpy dtype-like, a name or a torch dtype."""
    key = str(v).replace("torch.", "") if _is_torch_dtype(v) else v
    if isinstance(key, str) and key in ("bfloat16", "bf16"):
        return np.dtype(BFLOAT16)
    try:
        dt = np.dtype(key)
    except TypeError:
        dt = None
    if dt is None or dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {v!r}")
    return dt


def _is_torch_dtype(v) -> bool:
    return type(v).__module__.split(".")[0] == "torch"


def _smem(frame: Frame) -> int:
    return K.device_facts(frame.device_id)[0] if frame.backend == "cuda" else 0


def _permute_outputs(frame: Frame, out, T: int, k: int, E: int, x, D: int):
    """The caller's MoePermutation's arrays, validated: (counts, offsets, order, slot, x_perm, xp_rs)."""
    if not isinstance(out, MoePermutation):
        raise TypeError(f"out must be a MoePermutation (e.g. from an earlier moe_permute call), got "
                        f"{type(out).__name__}")
    for field, want in (("num_tokens", T), ("k", k), ("num_experts", E)):
        if getattr(out, field) != want:
            raise ValueError(f"out.{field} is {getattr(out, field)!r} but this call has {want}")
    n = T * k
    arrs = [_int32_out(frame, getattr(out, f), f"out.{f}", s)
            for f, s in (("counts", (E,)), ("offsets", (E + 1,)), ("order", (n,)), ("slot", (T, k)))]
    if x is None:
        if out.x_perm is not None:
            raise ValueError("out.x_perm must be None when x is not given")
        return arrs + [None, 0]
    if out.x_perm is None:
        raise ValueError("out.x_perm is None but x is given: it needs a [T * k, D] buffer")
    xp, xp_rs = _rows(frame, out.x_perm, "out.x_perm", written=True)
    if xp.dtype != x.dtype:
        raise TypeError(f"out.x_perm must have x's dtype {dtype_name(x.dtype)}, got {dtype_name(xp.dtype)}")
    if tuple(xp.shape) != (n, D):
        raise ValueError(f"out.x_perm must have shape [T * k, D] = {[n, D]}, got {list(xp.shape)}")
    return arrs + [xp, xp_rs]


# ---------------------------------------------------------------------------------------------
# public functions


@define_op(PERMUTE_OP, rule=permute_rule, kernels=K.PERMUTE_FAMILIES)
def moe_permute(indices, num_experts, x=None, *, out=None, errors=None, plan_only: bool = False):
    """Group the (token, expert) entries of a router's output by expert (MoE dispatch).

    A stable counting sort of the flat entries ``t * k + j`` by ``indices[t, j]``: expert 0's
    entries first, each expert's in ascending flat order; an entry of -1 takes no row.  Given
    ``x``, each token's row is copied to every permuted row it owns (read once, written once per
    expert).  Deterministic, and on the GPU without a host synchronisation.

    Args:
        indices: int32 ``[T, k]`` expert ids (any strides), -1 for "no expert".  Any other id
            outside [0, num_experts): the reference raises ``ValueError``; on the GPU the entry
            is skipped like -1 (no row, slot -1) and counted in ``errors``.
        num_experts: E >= 1 (the CUDA variants take E <= 1024).
        x: optional ``[T, D]`` float32 / bfloat16 / float16 token rows; each row contiguous, rows
            may be strided (a slice of a wider buffer).
        out: optional :class:`MoePermutation` to fill (same T, k, E; ``x_perm`` ``[T * k, D]`` in
            x's dtype exactly when x is given, rows may be strided; the int32 arrays
            C-contiguous): buffers that stay put, e.g. for CUDA graphs.
        errors: GPU only, an int32 device array of one element: the kernels add the number of
            entries whose id was neither -1 nor in [0, E) (no host synchronisation).

    Variants: ``reference`` (numpy), ``single_block`` (one block of 512 threads: per-warp
    histograms in shared memory, a block scan, a stable placement; for decode-sized T * k),
    ``chunked`` (the same over blocks of 1024 entries: a count kernel, a scan block, a place
    kernel; for prefill), each followed by one copy kernel for x (a block per token).

    Returns a :class:`MoePermutation` (``out`` itself when given).  Rows of ``x_perm`` from
    ``offsets[E]`` on are never written.
    """
    frame = Frame(indices, "indices")
    idx = frame.array
    if idx.dtype != np.int32:
        raise TypeError(f"indices must be int32, got {dtype_name(idx.dtype)}")
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"indices must have shape [T, k] with k >= 1, got {tuple(idx.shape)}")
    T, k = (int(d) for d in idx.shape)
    if T * k > MAX_ENTRIES:
        raise ValueError(f"indices: T * k = {T * k} entries is beyond the kernels' range ({MAX_ENTRIES}); "
                         "split the call along T")
    E = int_arg("num_experts", num_experts, lo=1)
    errs = check_errors(frame, errors)
    if frame.backend == "numpy":
        check_indices(idx, E)
    xa, x_rs, D = None, 0, 0
    if x is not None:
        xa, x_rs = _rows(frame, x, "x")
        if xa.shape[0] != T:
            raise ValueError(f"x must have shape [T, D] with T = {T} (indices' rows), got {tuple(xa.shape)}")
        D = int(xa.shape[1])
    given = None if out is None else _permute_outputs(frame, out, T, k, E, xa, D)
    if given is not None:
        _check_disjoint([(f"out.{f}", a) for f, a in zip(("counts", "offsets", "order", "slot", "x_perm"), given[:5])
                         if a is not None], [("indices", idx), ("x", xa)])
    copy_bytes = 0
    if xa is not None:
        row_bytes = D * xa.itemsize
        xp_probe = None if given is None else (given[4], given[5])
        aligned = row_bytes % 16 == 0 and _aligned16(xa, x_rs) and (xp_probe is None or _aligned16(*xp_probe))
        copy_bytes = 16 if aligned else xa.itemsize
    problem = MoePermuteProblem(frame.backend, pow2_bucket(T * k), E, "" if xa is None else dtype_name(xa.dtype),
                                copy_bytes, _smem(frame))
    if plan_only:
        return Call(problem)
    if given is None:
        counts, offsets = frame.empty((E,), np.int32), frame.empty((E + 1,), np.int32)
        order, slot = frame.empty((T * k,), np.int32), frame.empty((T, k), np.int32)
        x_perm = None if xa is None else frame.empty((T * k, D), xa.dtype)
        xp_rs = D
        arrays = (counts, offsets, order, slot, x_perm)
        result = MoePermutation(*(None if a is None else frame.give_back(a) for a in arrays), T, k, E)
    else:
        counts, offsets, order, slot, x_perm, xp_rs = given
        result = out
    args = MoePermuteArgs(frame.xp.ascontiguousarray(idx), E, counts, offsets, order, slot, xa, x_rs, x_perm,
                          xp_rs, errs, problem, frame)
    if T * k == 0:  # nothing to sort: every count and offset is 0 (a fill, no kernel of ours)
        with frame.running():
            counts.fill(0)
            offsets.fill(0)
    return Call(problem, args, frame, result, skip=T * k == 0, give_back=False, tune_run=private_errors_run(args))


@define_op(UNPERMUTE_OP, rule=unpermute_rule, kernels=K.UNPERMUTE_FAMILIES)
def moe_unpermute(y_perm, perm, weights, *, out=None, out_dtype=None, errors=None, plan_only: bool = False):
    """Add the experts' output rows back per token (MoE combine).

    ``out[t] = sum over j = 0 .. k-1 with perm.slot[t, j] >= 0 of weights[t, j] * y_perm[slot[t, j]]``,
    accumulated in float32 in that fixed order (each product and each sum rounded to float32; no
    atomics, so the result is the same on every run), rounded once to ``out_dtype``.  A token with
    no expert gets zeros.  No host synchronisation on the GPU.

    Args:
        y_perm: ``[M, D]`` float32 / bfloat16 / float16 expert outputs in permuted order (M >= N =
            ``perm.offsets[E]``; e.g. the ``[T * k, D]`` buffer of x_perm's shape); each row
            contiguous, rows may be strided.
        perm: the :class:`MoePermutation` of the matching :func:`moe_permute` call (only its
            ``slot`` ``[T, k]`` is read).  A slot that is neither -1 nor a row of y_perm: the
            reference raises ``ValueError``; on the GPU that entry is skipped and counted in
            ``errors``.
        weights: float32 ``[T, k]`` routing weights (any strides); those of skipped entries are
            not read.
        out: optional ``[T, D]`` output in ``out_dtype`` (each row contiguous, rows may be strided);
            it must not overlap y_perm.
        out_dtype: float32, bfloat16 or float16 (a numpy dtype, its name or a torch dtype);
            default: out's dtype when out is given, else y_perm's.
        errors: GPU only, an int32 device array of one element (bad slots are added to it).

    Variants: ``reference`` (numpy), ``naive`` (one block of 128 threads per token, 8 channels
    per thread with 16-byte accesses where the layout allows, else one).

    Returns ``out`` (``[T, D]``).
    """
    frame = Frame(y_perm, "y_perm")
    y, y_rs = _rows(frame, frame.array, "y_perm")
    M, D = (int(d) for d in y.shape)
    if not isinstance(perm, MoePermutation):
        raise TypeError(f"perm must be the MoePermutation moe_permute returned, got {type(perm).__name__}")
    slot = frame.convert(perm.slot, "perm.slot")
    if slot.dtype != np.int32:
        raise TypeError(f"perm.slot must be int32, got {dtype_name(slot.dtype)}")
    if slot.ndim != 2 or tuple(slot.shape) != (perm.num_tokens, perm.k):
        raise ValueError(f"perm.slot must have shape [T, k] = {[perm.num_tokens, perm.k]} (perm.num_tokens, perm.k), "
                         f"got {list(slot.shape)}")
    T, k = (int(d) for d in slot.shape)
    w = frame.convert(weights, "weights")
    if w.dtype != np.float32:
        raise TypeError(f"weights must be float32, got {dtype_name(w.dtype)}")
    if tuple(w.shape) != (T, k):
        raise ValueError(f"weights must have shape [T, k] = {[T, k]} (perm.slot's), got {list(w.shape)}")
    errs = check_errors(frame, errors)
    if frame.backend == "numpy":
        check_slots(slot, M)
    o, o_rs = None, D
    if out is not None:
        o, o_rs = _rows(frame, out, "out", written=True)
        if tuple(o.shape) != (T, D):
            raise ValueError(f"out must have shape [T, D] = {[T, D]}, got {list(o.shape)}")
        odt = np.dtype(o.dtype)
        asked = None if out_dtype is None else _float_dtype(out_dtype, "out_dtype")
        if asked is not None and asked != odt:
            raise TypeError(f"out has dtype {dtype_name(odt)} but out_dtype={dtype_name(asked)}")
        _check_disjoint([("out", o)], [("y_perm", y), ("perm.slot", slot), ("weights", w)])
    else:
        odt = np.dtype(y.dtype) if out_dtype is None else _float_dtype(out_dtype, "out_dtype")
    vec = 8 if (D % 8 == 0 and _aligned16(y, y_rs) and (o is None or _aligned16(o, o_rs))) else 1
    problem = MoeUnpermuteProblem(frame.backend, pow2_bucket(T), D, k, dtype_name(y.dtype), dtype_name(odt), vec)
    if plan_only:
        return Call(problem)
    if o is None:
        o = frame.empty((T, D), odt)
    xp = frame.xp
    args = MoeUnpermuteArgs(y, y_rs, xp.ascontiguousarray(slot), xp.ascontiguousarray(w), o, o_rs, errs, problem, frame)
    return Call(problem, args, frame, o, skip=T == 0 or D == 0, tune_run=private_errors_run(args))
