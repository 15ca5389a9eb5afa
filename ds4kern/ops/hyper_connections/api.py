"""Manifold-constrained hyper-connections (DeepSeek-V4): ``hc_pre``, ``hc_post`` and their fusion
``hc_post_pre``.  Semantics: ``shared/spec/hyper_connections.md``.

Each token keeps 4 residual streams ``X [4, D]``.  Before a sub-block (attention, MoE)::

    mix  = (X.flatten() @ hc_fn.T) * rsqrt(mean(X^2) + norm_eps)          # [24]
    pre  = sigmoid(mix[0:4] * hc_scale[0] + hc_base[0:4]) + hc_eps
    post = 2 * sigmoid(mix[4:8] * hc_scale[1] + hc_base[4:8])
    C    = (mix[8:24] * hc_scale[2] + hc_base[8:24]).reshape(4, 4)          # C[in, out]
    C    = softmax(C, axis=-1) + hc_eps;  C /= C.sum(axis=-2) + hc_eps
    repeat sinkhorn_iters - 1 times: C /= C.sum(axis=-1) + hc_eps;  C /= C.sum(axis=-2) + hc_eps
    x_in = sum_h pre[h] * X[h]                                             # bf16, the sub-block's input

and after it, with the sub-block's output ``y``: ``X_new[j] = post[j] * y + sum_i C[i, j] * X[i]``.

The public DeepSeek-V4 inference code keeps the streams in the model dtype (bf16) and hc_fn,
hc_base, hc_scale in float32; both float32 and bf16 streams are accepted here, and X_new has X's
dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ...core.args import pow2_bucket
from ...core.arrays import BFLOAT16, Frame, _is_torch, byte_span, data_ptr, dtype_name, same_view
from ...core.op import Call, define_op, reference_or
from . import kernels
from .reference import MIX, STREAMS
from .rule import rule

PRE_OP = "hc_pre"
POST_OP = "hc_post"
POST_PRE_OP = "hc_post_pre"
F32 = np.dtype(np.float32)
X_DTYPES = (F32, BFLOAT16)
MAX_SINKHORN_ITERS = 1 << 16


bucket_tokens = pow2_bucket  # B buckets: powers of two


@dataclass(frozen=True)
class HcProblem:
    """What variants' ``supports`` and the rule see.  ``tokens_bucket``: B rounded up to a power
    of two; ``dtype``: the streams' (X and X_new); ``y_dtype``: the sub-block output's ("" for
    hc_pre); ``vec``: 4 when every stream-sized array (X, X_new, y, hc_fn, x_in) allows 4-channel
    vector accesses (D a multiple of 4, base addresses and row strides aligned), else 1."""

    backend: str
    tokens_bucket: int
    dim: int
    dtype: str
    y_dtype: str
    vec: int

    def __str__(self) -> str:
        y = f", y {self.y_dtype}" if self.y_dtype else ""
        return (f"backend={self.backend} B<={self.tokens_bucket} D={self.dim} X {self.dtype}{y} "
                f"({'4-channel' if self.vec == 4 else 'scalar'} accesses)")

    @property
    def bucket(self) -> tuple:
        return (self.tokens_bucket, self.dim, self.dtype, self.y_dtype, self.vec)


@dataclass
class HcArgs:
    """Validated arguments handed to a variant.  Streams (``X``, ``X_new``) ``[B, 4, D]`` with a
    contiguous last axis and element strides ``*_ts`` (token) / ``*_hs`` (stream); ``y`` ``[B, D]``
    with token stride ``y_ts``; ``post_in`` / ``comb_in`` float32 ``[B, 4]`` / ``[B, 4, 4]``
    contiguous; ``hc_fn`` float32 ``[24, 4D]`` and ``hc_base`` float32 ``[24]`` contiguous;
    ``hc_scale``: three host floats, or None when ``hc_scale_dev`` (float32 ``[3]`` on the device)
    is to be read by the kernels.  Outputs (contiguous): ``x_in`` bf16 ``[B, D]``, ``post``
    ``[B, 4]``, ``comb`` ``[B, 4, 4]``.  Fields an op does not use are None."""

    X: Any
    x_ts: int
    x_hs: int
    hc_fn: Any = None
    hc_scale: Optional[tuple] = None
    hc_scale_dev: Any = None
    hc_base: Any = None
    norm_eps: float = 1e-6
    hc_eps: float = 1e-6
    iters: int = 20
    y: Any = None
    y_ts: int = 0
    post_in: Any = None
    comb_in: Any = None
    X_new: Any = None
    n_ts: int = 0
    n_hs: int = 0
    x_in: Any = None
    post: Any = None
    comb: Any = None
    inplace: bool = False
    problem: Optional[HcProblem] = None
    frame: Optional[Frame] = None

    @property
    def tokens(self) -> int:
        return int(self.X.shape[0])

    @property
    def dim(self) -> int:
        return int(self.X.shape[2])

    def scale_values(self) -> tuple:
        """hc_scale as three host floats (the reference backend always has them)."""
        return self.hc_scale


# ---------------------------------------------------------------------------------------
# validation helpers


def _check_overlaps(inputs, outputs, inplace=None):
    """Outputs overlap neither each other nor any input; ``inplace``: an ``(output, input)`` pair
    of names that may be exactly the same view (an in-place update)."""
    spans = [(n, a, byte_span(a), True) for n, a in outputs if a is not None]
    spans += [(n, a, byte_span(a), False) for n, a in inputs if a is not None]
    for i, (n0, a0, s0, out0) in enumerate(spans):
        for n1, a1, s1, out1 in spans[i + 1:]:
            if not (out0 or out1) or s0 is None or s1 is None or not (s0[0] < s1[1] and s1[0] < s0[1]):
                continue
            if inplace == (n0, n1) and same_view(a0, a1):
                continue
            hint = f" ({n0} may be exactly {n1}, for an update in place)" if inplace == (n0, n1) else ""
            raise ValueError(f"{n0} overlaps {n1} in memory; an output must be its own buffer{hint}")


def _elem_strides(a, name: str):
    st = tuple(a.strides)
    if any(s < 0 or s % a.itemsize for s in st):
        raise ValueError(f"{name} must have non-negative strides that are multiples of its item size, got {st}")
    return tuple(s // a.itemsize for s in st)


def _self_overlapping(shape, strides) -> bool:
    """Whether distinct indices of a view (element strides) can name the same element."""
    dims = sorted((s, n) for n, s in zip(shape, strides) if n > 1)
    extent = 1
    for s, n in dims:
        if s < extent:
            return True
        extent = s * (n - 1) + extent
    return False


def _streams_in(frame, x, name):
    """A ``[B, 4, D]`` float32 / bf16 stream input with a contiguous last axis (copied if not)."""
    a = frame.array if x is None else frame.convert(x, name)
    if a.dtype not in X_DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16, got {dtype_name(a.dtype)}")
    if a.ndim != 3 or a.shape[1] != STREAMS or a.shape[2] < 1:
        raise ValueError(f"{name} must have shape [B, 4, D] with D >= 1, got {tuple(a.shape)}")
    st = tuple(a.strides)
    if any(s < 0 or s % a.itemsize for s in st) or (a.shape[2] > 1 and st[2] != a.itemsize):
        a = frame.xp.ascontiguousarray(a)
    e = _elem_strides(a, name)
    return a, e[0], e[1]


def _tokens_in(frame, y, name, B, D):
    a = frame.convert(y, name)
    if a.dtype not in X_DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != (B, D):
        raise ValueError(f"{name} must have shape [B, D] = ({B}, {D}), got {tuple(a.shape)}")
    st = tuple(a.strides)
    if any(s < 0 or s % a.itemsize for s in st) or (D > 1 and st[1] != a.itemsize):
        a = frame.xp.ascontiguousarray(a)
    return a, _elem_strides(a, name)[0]


def _float32_in(frame, x, name, shape):
    a = frame.convert(x, name)
    if a.dtype != F32:
        raise TypeError(f"{name} must be float32, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(a.shape)}")
    return frame.xp.ascontiguousarray(a)


def _hc_scale(frame, hc_scale):
    """``(three host floats, None)`` or, for GPU calls given a device array, ``(None, array)``."""
    host = isinstance(hc_scale, (list, tuple, np.ndarray)) or (_is_torch(hc_scale) and not hc_scale.is_cuda)
    if host:
        raw = hc_scale.detach().float().numpy() if _is_torch(hc_scale) else hc_scale
        try:
            v = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"hc_scale must be three numbers, got {hc_scale!r}") from None
        if v.shape != (3,):
            raise ValueError(f"hc_scale must have shape [3], got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"hc_scale must be finite, got {v.tolist()}")
        return tuple(float(s) for s in v), None
    if frame.backend == "numpy":
        raise TypeError(f"hc_scale must be three host numbers (list, tuple, numpy array), got "
                        f"{type(hc_scale).__module__}.{type(hc_scale).__name__}")
    a = _float32_in(frame, hc_scale, "hc_scale", (3,))
    return None, a


def _eps(v, name) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _iters(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"sinkhorn_iters must be an int, got {v!r}")
    if not 1 <= v <= MAX_SINKHORN_ITERS:
        raise ValueError(f"sinkhorn_iters must be in [1, {MAX_SINKHORN_ITERS}], got {v}")
    return int(v)


def _out(frame, x, name, dtype, shape):
    a = frame.convert(x, name, written=True)
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {a.strides})")
    return a


def _streams_out(frame, x, name, dtype, shape):
    a = frame.convert(x, name, written=True)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have X's dtype {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have X's shape {list(shape)}, got {tuple(a.shape)}")
    e = _elem_strides(a, name)
    if shape[2] > 1 and e[2] != 1:
        raise ValueError(f"{name}: its last axis must be contiguous (strides {a.strides})")
    if _self_overlapping(a.shape, e):
        raise ValueError(f"{name}: its elements overlap one another (strides {a.strides})")
    return a, e[0], e[1]


def _split_out(out, n, what):
    if out is None:
        return (None,) * n
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise TypeError(f"out must be a tuple {what} (entries may be None), got {type(out).__name__}")
    return tuple(out)


def _vec(frame, D, streams, others) -> int:
    """4 when 4-channel accesses are safe on every stream-sized array: D % 4 == 0, each base
    address a multiple of 4 items, each row stride (elements) a multiple of 4."""
    if D % 4:
        return 1
    for a, strides in list(streams) + [(o, ()) for o in others]:
        if a is None or a.size == 0:
            continue
        if data_ptr(a) % (4 * a.itemsize) or any(s % 4 for s in strides):
            return 1
    return 4


def _mix_args(frame, D, hc_fn, hc_scale, hc_base, norm_eps, hc_eps, sinkhorn_iters) -> dict:
    fn = _float32_in(frame, hc_fn, "hc_fn", (MIX, STREAMS * D))
    scale, scale_dev = _hc_scale(frame, hc_scale)
    base = _float32_in(frame, hc_base, "hc_base", (MIX,))
    return dict(hc_fn=fn, hc_scale=scale, hc_scale_dev=scale_dev, hc_base=base,
                norm_eps=_eps(norm_eps, "norm_eps"), hc_eps=_eps(hc_eps, "hc_eps"), iters=_iters(sinkhorn_iters))


def _mix_outputs(frame, outs, names, B, D, plan_only):
    x_in, post, comb = outs
    shapes = ((B, D), (B, STREAMS), (B, STREAMS, STREAMS))
    dtypes = (BFLOAT16, F32, F32)
    got = []
    for o, n, shp, dt in zip((x_in, post, comb), names, shapes, dtypes):
        if o is not None:
            got.append(_out(frame, o, n, dt, shp))
        else:
            got.append(None if plan_only else frame.empty(shp, dt))
    return got


def _post_inputs(frame, post, comb, B):
    p = _float32_in(frame, post, "post", (B, STREAMS))
    c = _float32_in(frame, comb, "comb", (B, STREAMS, STREAMS))
    return p, c


def _scratch_run(a: HcArgs):
    """``run(variant)`` for autotune on an in-place call: X_new goes to a private buffer, so
    timing the candidates never updates the caller's streams."""
    holder = {}

    def run(var):
        if "args" not in holder:
            new = a.frame.xp.empty(a.X_new.shape, a.X_new.dtype)
            st = _elem_strides(new, "X_new")
            holder["args"] = replace(a, X_new=new, n_ts=st[0], n_hs=st[1], inplace=False)
        var.fn(holder["args"])

    return run


# ---------------------------------------------------------------------------------------
# public functions


@define_op(PRE_OP, rule=rule, kernels=(kernels.PRE, kernels.PRE_TILED))
def hc_pre(X, hc_fn, hc_scale, hc_base, *, norm_eps: float = 1e-6, hc_eps: float = 1e-6, sinkhorn_iters: int = 20,
           out=None, plan_only: bool = False):
    """Hyper-connections before a sub-block: mix the 4 streams of each token into its input.

    Per token: the 24 dot products of the flattened streams with ``hc_fn``, the RMS factor, the
    sigmoids and the Sinkhorn iterations of the 4x4 matrix (module docstring), and
    ``x_in = sum_h pre[h] * X[h]``.  One launch on the GPU (two for ``tiled``).

    Args:
        X: ``[B, 4, D]`` float32 or bfloat16 streams (any strides; a non-contiguous last axis is
            copied).  NaN in a token's streams makes that token's outputs NaN and nothing else.
        hc_fn: float32 ``[24, 4 * D]`` (rows: 4 pre, 4 post, 16 comb; columns: X flattened,
            stream-major).
        hc_scale: 3 numbers: a host sequence / numpy array (checked finite, passed to the
            kernels by value: nothing is read back from the GPU), or on the GPU a float32
            device array ``[3]`` (read by the kernels; not checked, which would need a sync).
        hc_base: float32 ``[24]`` (on the inputs' device).
        norm_eps: added to mean(X^2) before the reciprocal square root (>= 0).
        hc_eps: the sigmoid / Sinkhorn epsilon (>= 0).
        sinkhorn_iters: Sinkhorn iterations in all, the row softmax counting as the first row
            step (>= 1; DeepSeek-V4: 20).
        out: optional ``(x_in, post, comb)``; each entry None or a C-contiguous array of the
            shape and dtype below, overlapping no input.

    Variants (GPU): ``naive`` (one block per token), ``grouped`` (2 or 4 tokens per block: each
    hc_fn element loaded serves all of them), ``split`` (for small B: each token group's 4D-long
    dot products spread over several blocks; the last block to finish, found with an atomic
    counter, adds the partial sums in a fixed order, runs the finish and writes x_in), ``tiled``
    (for large B, hc_pre only: the dot products as a tiled product, 256 tokens per block sharing
    each staged hc_fn chunk, split-K partial sums; then one block per 4 tokens adds them in a fixed
    order, finishes and writes x_in: two launches, since x_in needs every token's finished pre;
    scratch ``KS * B * 128`` bytes); on the host ``reference`` (numpy, float64).  split keeps a small workspace per (device, stream)
    that its kernels leave zeroed; two split calls on one stream never overlap, but one
    workspace must not serve two concurrently running graph replays of different captures.
    The rule (measured on an H100): split up to 128 tokens, tiled from 256, naive or grouped where
    tiled cannot run (D not a multiple of 32, or no 4-channel accesses).

    Returns ``(x_in, post, comb)``: bf16 ``[B, D]``, float32 ``[B, 4]``, float32 ``[B, 4, 4]``
    (``comb[b, i, j]``: from stream i into stream j).
    """
    frame = Frame(X, "X")
    x, x_ts, x_hs = _streams_in(frame, None, "X")
    B, D = int(x.shape[0]), int(x.shape[2])
    mix = _mix_args(frame, D, hc_fn, hc_scale, hc_base, norm_eps, hc_eps, sinkhorn_iters)
    names = ("out[0] (x_in)", "out[1] (post)", "out[2] (comb)")
    outs = _mix_outputs(frame, _split_out(out, 3, "(x_in, post, comb)"), names, B, D, plan_only)
    _check_overlaps([("X", x), ("hc_fn", mix["hc_fn"]), ("hc_base", mix["hc_base"]),
                     ("hc_scale", mix["hc_scale_dev"])], list(zip(names, outs)))
    vec = _vec(frame, D, [(x, (x_ts, x_hs))], [mix["hc_fn"], outs[0]])
    problem = HcProblem(frame.backend, bucket_tokens(B), D, dtype_name(x.dtype), "", vec)
    if plan_only:
        return Call(problem)
    args = HcArgs(x, x_ts, x_hs, x_in=outs[0], post=outs[1], comb=outs[2], problem=problem, frame=frame, **mix)
    return Call(problem, args, frame, tuple(outs), skip=B == 0)


@define_op(POST_OP, rule=reference_or("naive"), kernels=(kernels.POST,))
def hc_post(y, X, post, comb, *, out=None, plan_only: bool = False):
    """Hyper-connections after a sub-block: ``X_new[j] = post[j] * y + sum_i comb[i, j] * X[i]``
    per token (float32 arithmetic, stored in X's dtype).  One launch on the GPU.

    Args:
        y: ``[B, D]`` float32 or bfloat16, the sub-block's output.
        X: ``[B, 4, D]`` float32 or bfloat16 streams (the sub-block's hc_pre input).
        post: float32 ``[B, 4]``; comb: float32 ``[B, 4, 4]`` (from :func:`hc_pre`).
        out: optional X_new ``[B, 4, D]`` of X's dtype with a contiguous last axis; it may be X
            itself (updated in place) but must not overlap any input otherwise.

    Variants: ``naive`` (GPU: one thread per 4 channels of all four streams, blocks over
    (token, channel run); there is no reduction, so nothing to split), ``reference`` (host).

    Returns ``X_new`` (``[B, 4, D]``, X's dtype).
    """
    frame = Frame(y, "y")
    x, x_ts, x_hs = _streams_in(frame, X, "X")
    B, D = int(x.shape[0]), int(x.shape[2])
    yy, y_ts = _tokens_in(frame, frame.array, "y", B, D)
    p, c = _post_inputs(frame, post, comb, B)
    inplace = False
    if out is not None:
        xn, n_ts, n_hs = _streams_out(frame, out, "out", x.dtype, x.shape)
        inplace = xn.size > 0 and same_view(xn, x)
    else:
        xn, n_ts, n_hs = None, 4 * D, D
    _check_overlaps([("y", yy), ("X", x), ("post", p), ("comb", c)], [("out", xn)], inplace=("out", "X"))
    vec = _vec(frame, D, [(x, (x_ts, x_hs)), (yy, (y_ts,)), (xn, (n_ts, n_hs))], [])
    problem = HcProblem(frame.backend, bucket_tokens(B), D, dtype_name(x.dtype), dtype_name(yy.dtype), vec)
    if plan_only:
        return Call(problem)
    if xn is None:
        xn = frame.empty(x.shape, x.dtype)
    args = HcArgs(x, x_ts, x_hs, y=yy, y_ts=y_ts, post_in=p, comb_in=c, X_new=xn, n_ts=n_ts, n_hs=n_hs,
                  inplace=inplace, problem=problem, frame=frame)
    return Call(problem, args, frame, xn, skip=B == 0, tune_run=_scratch_run(args) if inplace else None)


@define_op(POST_PRE_OP, rule=rule, kernels=(kernels.POST_PRE, kernels.POST, kernels.PRE_TILED))
def hc_post_pre(y, X, post, comb, hc_fn, hc_scale, hc_base, *, norm_eps: float = 1e-6, hc_eps: float = 1e-6,
                sinkhorn_iters: int = 20, out=None, plan_only: bool = False):
    """The boundary between two sub-blocks: :func:`hc_post` of the one that ran, then
    :func:`hc_pre` of the next (its own ``hc_fn``, ``hc_scale``, ``hc_base``) on X_new as stored
    (rounded to X's dtype), in one launch on the GPU.

    One launch suffices: with one block per token (group) the block holds everything x_in needs
    once its reduction is done; split's cross-block reduction is closed by its last block
    (atomic counter) instead of a second kernel.

    Args:
        y, X, post, comb: as in :func:`hc_post` (``post`` / ``comb`` of the sub-block that ran).
        hc_fn, hc_scale, hc_base, norm_eps, hc_eps, sinkhorn_iters: the next sub-block's, as in
            :func:`hc_pre`.
        out: optional ``(X_new, x_in, post, comb)`` (entries may be None).  X_new may be X itself
            (in place); no other output may overlap an input, so the new post / comb need their
            own buffers.

    Variants: as :func:`hc_pre` (``naive``, ``grouped``, ``split``, ``reference``), and ``tiled``:
    hc_post's kernel writes X_new, then hc_pre's tiled variant runs on X_new as stored (three
    launches; X_new is read back twice).  The rule: split up to 128 tokens, naive at 256, tiled
    from 512 (naive or grouped where tiled cannot run).

    Returns ``(X_new, x_in, post, comb)``: X_new ``[B, 4, D]`` in X's dtype, the others as
    :func:`hc_pre` returns them for X_new.
    """
    frame = Frame(y, "y")
    x, x_ts, x_hs = _streams_in(frame, X, "X")
    B, D = int(x.shape[0]), int(x.shape[2])
    yy, y_ts = _tokens_in(frame, frame.array, "y", B, D)
    p, c = _post_inputs(frame, post, comb, B)
    mix = _mix_args(frame, D, hc_fn, hc_scale, hc_base, norm_eps, hc_eps, sinkhorn_iters)
    o_new, *o_mix = _split_out(out, 4, "(X_new, x_in, post, comb)")
    inplace = False
    if o_new is not None:
        xn, n_ts, n_hs = _streams_out(frame, o_new, "out[0] (X_new)", x.dtype, x.shape)
        inplace = xn.size > 0 and same_view(xn, x)
    else:
        xn, n_ts, n_hs = None, 4 * D, D
    names = ("out[1] (x_in)", "out[2] (post)", "out[3] (comb)")
    outs = _mix_outputs(frame, o_mix, names, B, D, plan_only)
    _check_overlaps([("y", yy), ("X", x), ("post", p), ("comb", c), ("hc_fn", mix["hc_fn"]),
                     ("hc_base", mix["hc_base"]), ("hc_scale", mix["hc_scale_dev"])],
                    [("out[0] (X_new)", xn)] + list(zip(names, outs)), inplace=("out[0] (X_new)", "X"))
    vec = _vec(frame, D, [(x, (x_ts, x_hs)), (yy, (y_ts,)), (xn, (n_ts, n_hs))], [mix["hc_fn"], outs[0]])
    problem = HcProblem(frame.backend, bucket_tokens(B), D, dtype_name(x.dtype), dtype_name(yy.dtype), vec)
    if plan_only:
        return Call(problem)
    if xn is None:
        xn = frame.empty(x.shape, x.dtype)
    args = HcArgs(x, x_ts, x_hs, y=yy, y_ts=y_ts, post_in=p, comb_in=c, X_new=xn, n_ts=n_ts, n_hs=n_hs,
                  x_in=outs[0], post=outs[1], comb=outs[2], inplace=inplace, problem=problem, frame=frame, **mix)
    return Call(problem, args, frame, (xn,) + tuple(outs), skip=B == 0,
                tune_run=_scratch_run(args) if inplace else None)
