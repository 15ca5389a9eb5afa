"""A "torch eager composite" of one DeepSeek-V4 layer's decode step (attention block, then MoE
block), the baseline the decode step is timed against: the same math as
``ds4kern.models.deepseek_v4.attention.attention_decode`` + ``moe.moe_block`` on the same
weights, written as a torch user would in eager mode (batched tensor ops, a Python loop over the
touched experts, the indexer as a dense score over every visible key then top-k, sparse
attention as gather + two matmuls + softmax with the sink + inverse RoPE).  No ds4kern op runs
in it; only the config, the RoPE tables and (for ``main``) the ds4kern model it is timed against
come from ds4kern.

The composite is written once against a thin array-namespace adaptor: :class:`NumpyOps` (host
numpy, float32 arithmetic, ``ml_dtypes`` bfloat16 storage: checked on CPU by
``tests/models/test_torch_composite.py``) and :class:`TorchOps` (torch tensors on CUDA, the
benchmark).  The adaptor's primitives, one line each in both classes::

    asarray (host / CuPy / torch -> library array; CuPy through DLPack, zero-copy), index (host
    ints -> int64), to_host, copy, f32, bf16 (round to bfloat16 storage), zeros, full, arange,
    matmul (float32), linear / bmm (bf16 operands, float32 accumulation, float32 or bf16 out),
    exp, log1p, sqrt, maximum, minimum, clip, where, sum / mean / amax along an axis, topk
    (last axis, descending), take_along (gather along the last axis), transpose (permute),
    concat, stack, sync

Array syntax both libraries share is used directly: ``a[i]`` / ``a[b, i]`` gathers with int64
index arrays, ``a[i] = v`` scatters of rows, basic slicing (with a step), ``reshape``,
arithmetic, comparisons and ``%`` (floor modulo in both).

bf16 rounding at the places the ds4kern block rounds: the normed rows read by the projections,
the q_lora rows, q, the KV rows, the compressors' inputs and emitted rows, the indexer queries,
the attention output, the grouped output projection's output and the block output; in the MoE
block the expert inputs, the SwiGLU intermediate, the expert outputs and the block output.

Torch notes (this side cannot be run on the CPU machine; it mirrors the numpy side primitive by
primitive):
- ``linear`` / ``bmm`` with float32 output use ``torch.mm`` / ``torch.bmm`` with
  ``out_dtype=torch.float32`` (bf16 tensor cores, float32 accumulation, one float32 result: what
  ds4kern's ``grouped_linear`` computes) when the installed torch has it (probed once); without
  it ``linear`` rounds its result to bf16 first (``F.linear`` in bf16, then ``.float()``: one
  extra rounding of order 2^-9, no float32 copy of a weight), and ``bmm`` (only activations:
  attention and indexer scores) runs in float32 on float32 copies of its operands.
- ``topk`` is ``torch.topk`` (sorted): ties between equal float32 scores are not guaranteed to go
  to the lower index as ds4kern's top-k does; such exact ties are rare with real-valued scores
  and show up in ``main``'s agreement count like any near-tie.
- The expert loop needs the touched expert ids on the host (one device-to-host copy per MoE
  block, and one host-to-device copy of each expert's row list), which is what an eager
  implementation does; positions are host values (as ds4kern's decode takes them too).

``python bench/models/torch_composite.py --layers 4 --batch 1 64 --context 65536`` on a GPU machine
(CuPy and torch): builds the ds4kern model, fills the KV states at ``context``, builds the
composite on the same weight arrays (zero-copy) with its own copy of the states, checks one step
layer by layer against ds4kern's, then times both per decode step and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from ds4kern.core.arrays import BFLOAT16
from ds4kern.models.deepseek_v4.attention import rope_tables
from ds4kern.models.deepseek_v4.config import HEAD_DIM, INDEX_DIM, INDEX_HEADS, ROPE_DIM, Config


# -- the adaptor ---------------------------------------------------------------------------------


def _host(a):
    """A numpy array of a numpy / CuPy array / torch tensor (a copy to the host for device ones)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch (not bf16: only indices and float32 come this way)
        return a.detach().cpu().numpy()
    if hasattr(a, "get"):     # CuPy
        return a.get()
    return np.asarray(a)


class NumpyOps:
    """numpy: float32 arithmetic, bf16 storage as ``ml_dtypes`` bfloat16 arrays."""

    name = "numpy"

    def __init__(self):
        self.f32_t, self.bf16_t, self.i64_t = np.dtype(np.float32), np.dtype(BFLOAT16), np.dtype(np.int64)

    # conversions and constructors
    def asarray(self, a, dtype=None):
        a = _host(a)
        return a if dtype is None else a.astype(dtype)

    def index(self, a):
        return np.asarray(_host(a)).astype(np.int64)

    def to_host(self, a):
        return np.asarray(a)

    def copy(self, a):
        return np.array(_host(a), copy=True)

    def f32(self, a):
        return a.astype(np.float32)

    def bf16(self, a):
        return a.astype(np.float32).astype(BFLOAT16)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def arange(self, n):
        return np.arange(n, dtype=np.int64)

    # products
    def matmul(self, a, b):
        return np.matmul(a.astype(np.float32), b.astype(np.float32))

    def linear(self, x, w, out_bf16=False):
        """``x @ w.T`` of bf16 rows ``x`` ``[n, in]`` and a bf16 weight ``w`` ``[out, in]``."""
        y = np.matmul(x.astype(np.float32), w.astype(np.float32).T)
        return self.bf16(y) if out_bf16 else y

    def bmm(self, a, b, out_bf16=False):
        """Batched ``a @ b`` of bf16 ``[G, n, k]`` and ``[G, k, m]``."""
        y = np.matmul(a.astype(np.float32), b.astype(np.float32))
        return self.bf16(y) if out_bf16 else y

    # elementwise and reductions
    def exp(self, a):
        with np.errstate(over="ignore"):
            return np.exp(a)

    def log1p(self, a):
        return np.log1p(a)

    def sqrt(self, a):
        return np.sqrt(a)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def clip(self, a, lo, hi):
        return np.clip(a, lo, hi)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def sum(self, a, axis, keepdims=False):
        return a.sum(axis=axis, keepdims=keepdims)

    def mean(self, a, axis, keepdims=False):
        return a.mean(axis=axis, keepdims=keepdims)

    def amax(self, a, axis, keepdims=False):
        return a.max(axis=axis, keepdims=keepdims)

    def topk(self, a, k):
        """``(values, int64 indices)`` of the k largest along the last axis, descending, ties to
        the lower index."""
        idx = np.argsort(-a, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(a, idx, axis=-1), idx

    def take_along(self, a, idx):
        return np.take_along_axis(a, idx, axis=-1)

    # shapes
    def transpose(self, a, axes):
        return a.transpose(axes)

    def concat(self, arrays, axis):
        return np.concatenate(arrays, axis=axis)

    def stack(self, arrays, axis):
        return np.stack(arrays, axis=axis)

    def sync(self):
        pass


class TorchOps:
    """torch tensors on a CUDA device (see the module docstring's torch notes)."""

    name = "torch"

    def __init__(self, device=None):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.f32_t, self.bf16_t, self.i64_t = torch.float32, torch.bfloat16, torch.int64
        self.mixed_out = self._has_out_dtype()

    def _has_out_dtype(self) -> bool:
        """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` exists (torch 2.8+ on CUDA)."""
        t = self.torch
        a = t.ones((2, 2), dtype=t.bfloat16, device=self.device)
        try:
            return t.mm(a, a, out_dtype=t.float32).dtype == t.float32
        except (TypeError, RuntimeError):
            return False

    # conversions and constructors
    def asarray(self, a, dtype=None):
        """A tensor on the device: torch tensors as they are, CuPy arrays through DLPack (zero-copy;
        bf16 through an int16 view, so no DLPack bfloat16 support is needed), host arrays copied."""
        t = self.torch
        if isinstance(a, t.Tensor):
            out = a
        elif isinstance(a, np.ndarray):
            c = np.ascontiguousarray(a)
            out = t.from_numpy(c.view(np.int16)).view(t.bfloat16) if c.dtype == BFLOAT16 else t.from_numpy(c)
        elif hasattr(a, "__cuda_array_interface__"):
            out = t.from_dlpack(a.view(np.int16)).view(t.bfloat16) if a.dtype == BFLOAT16 else t.from_dlpack(a)
        else:
            out = t.as_tensor(a)
        out = out.to(self.device)
        return out if dtype is None else out.to(dtype)

    def index(self, a):
        if not isinstance(a, self.torch.Tensor) and not hasattr(a, "__cuda_array_interface__"):
            a = np.asarray(a).astype(np.int64)
        return self.asarray(a).to(self.torch.int64)

    def to_host(self, a):
        a = a.detach()
        if a.dtype == self.torch.bfloat16:
            a = a.float()
        return a.cpu().numpy()

    def copy(self, a):
        return self.asarray(a).clone()

    def f32(self, a):
        return a.float()

    def bf16(self, a):
        return a.to(self.torch.bfloat16)

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape, value, dtype):
        return self.torch.full(shape, value, dtype=dtype, device=self.device)

    def arange(self, n):
        return self.torch.arange(n, dtype=self.torch.int64, device=self.device)

    # products
    def matmul(self, a, b):
        return self.torch.matmul(a.float(), b.float())

    def linear(self, x, w, out_bf16=False):
        t = self.torch
        if out_bf16:
            return t.nn.functional.linear(x, w)
        if self.mixed_out:
            return t.mm(x, w.t(), out_dtype=t.float32)
        return t.nn.functional.linear(x, w).float()

    def bmm(self, a, b, out_bf16=False):
        t = self.torch
        if out_bf16:
            return t.bmm(a, b)
        if self.mixed_out:
            return t.bmm(a, b, out_dtype=t.float32)
        return t.bmm(a.float(), b.float())

    # elementwise and reductions
    def exp(self, a):
        return self.torch.exp(a)

    def log1p(self, a):
        return self.torch.log1p(a)

    def sqrt(self, a):
        return self.torch.sqrt(a)

    def maximum(self, a, b):
        return self.torch.clamp(a, min=b) if isinstance(b, (int, float)) else self.torch.maximum(a, b)

    def minimum(self, a, b):
        return self.torch.clamp(a, max=b) if isinstance(b, (int, float)) else self.torch.minimum(a, b)

    def clip(self, a, lo, hi):
        return self.torch.clamp(a, lo, hi)

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def sum(self, a, axis, keepdims=False):
        return a.sum(dim=axis, keepdim=keepdims)

    def mean(self, a, axis, keepdims=False):
        return a.mean(dim=axis, keepdim=keepdims)

    def amax(self, a, axis, keepdims=False):
        return a.amax(dim=axis, keepdim=keepdims)

    def topk(self, a, k):
        v, i = self.torch.topk(a, k, dim=-1, largest=True, sorted=True)
        return v, i

    def take_along(self, a, idx):
        return self.torch.gather(a, -1, idx)

    # shapes
    def transpose(self, a, axes):
        return a.permute(*axes)

    def concat(self, arrays, axis):
        return self.torch.cat(arrays, dim=axis)

    def stack(self, arrays, axis):
        return self.torch.stack(arrays, dim=axis)

    def sync(self):
        self.torch.cuda.synchronize(self.device)


# -- the composite ---------------------------------------------------------------------------------


class TorchCompositeLayer:
    """One layer (attention block, then MoE block) for B sequences, on the arrays of ``ops``.

    Weights come from the ds4kern layer's ``AttentionWeights`` / ``MoeWeights`` through
    ``ops.asarray`` (TorchOps: the same device memory, zero-copy; NumpyOps: host arrays, ``.get()``
    of CuPy ones); the state (KV pool with the window ring, compressor states, indexer keys,
    next positions) is this object's own copy of the ``LayerState`` as it is now."""

    _ATTN = ("hc_fn", "hc_scale", "hc_base", "attn_norm", "wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "sink",
             "wo_a", "wo_b", "c_wkv", "c_wgate", "c_ape", "c_norm", "i_wq_b", "i_wproj", "i_wkv", "i_wgate",
             "i_ape", "i_norm")
    _MOE = ("hc_fn", "hc_scale", "hc_base", "ffn_norm", "gate", "bias", "w_gate", "w_up", "w_down", "s_gate",
            "s_up", "s_down", "tid2eid")

    def __init__(self, cfg: Config, attn, moe, state, ops):
        """``moe=None``: only :meth:`attention` can run (the attention block alone)."""
        if attn.kind != state.kind:
            raise ValueError(f"weights are for a {attn.kind!r} layer, the state for a {state.kind!r} layer")
        self.cfg, self.ops, self.kind = cfg, ops, attn.kind
        self.ratio, self.rows, self.batch = state.ratio, state.rows, state.batch
        self.ring_base = state.ring_base
        self.a = {k: None if getattr(attn, k) is None else ops.asarray(getattr(attn, k)) for k in self._ATTN}
        # moe=None: the attention block alone (bench/models/attention_bench.py)
        self.hash = bool(moe.hash) if moe is not None else False
        self.m = None if moe is None else {k: None if getattr(moe, k) is None else ops.asarray(getattr(moe, k))
                                           for k in self._MOE}
        self.resident = 0 if moe is None else int(self.m["w_gate"].shape[0])
        cos, sin = rope_tables(cfg, self.ratio)  # host float32 [max_context, 32]
        self.cos, self.sin = ops.asarray(cos), ops.asarray(sin)
        # this object's own state
        self.pool = ops.copy(state.pool)
        self.comp = None if state.comp is None else (ops.copy(state.comp[0]), ops.copy(state.comp[1]))
        self.index_keys = None if state.index_keys is None else ops.copy(state.index_keys)
        self.index_comp = None if state.index_comp is None else (ops.copy(state.index_comp[0]),
                                                                 ops.copy(state.index_comp[1]))
        self.next_pos = np.asarray(state.next_pos, np.int64).copy()
        self.last_selected = None  # CSA: the indexer's columns [B, index_topk] of the last step
        self.last_indices = None   # the routing's experts [B, k] of the last step

    # -- shared pieces --------------------------------------------------------------------------

    def _rms(self, x, w):
        o, eps = self.ops, self.cfg.norm_eps
        x = o.f32(x)
        y = x * (1.0 / o.sqrt(o.mean(x * x, -1, keepdims=True) + eps))
        return y if w is None else y * w

    def _rope(self, x, c, s, inverse=False):
        """Interleaved pairs (2i, 2i+1) of ``x`` ``[B, ..., 64]`` (float32) rotated by ``c``, ``s``
        ``[B, 32]`` (broadcast over the axes between); ``inverse``: the conjugate rotation."""
        o = self.ops
        shape = (c.shape[0],) + (1,) * (len(x.shape) - 2) + (c.shape[1],)
        c, s = c.reshape(shape), s.reshape(shape)
        if inverse:
            s = -s
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return o.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(x.shape)

    def _rope_tail(self, x, c, s, inverse=False):
        """RoPE on the last 64 channels of ``x`` ``[..., d]`` (float32)."""
        d = x.shape[-1]
        return self.ops.concat([x[..., :d - ROPE_DIM], self._rope(x[..., d - ROPE_DIM:], c, s, inverse)], -1)

    def _hc_pre(self, X, fn, scale, base):
        """``(x_in bf16 [B, D], post [B, 4], comb [B, 4, 4])`` of the streams ``X`` ``[B, 4, D]``."""
        o, cfg = self.ops, self.cfg
        B = X.shape[0]
        flat = X.reshape(B, -1)
        r = 1.0 / o.sqrt(o.mean(flat * flat, 1, keepdims=True) + cfg.norm_eps)
        mix = o.matmul(flat, o.transpose(fn, (1, 0))) * r                        # [B, 24]
        pre = 1.0 / (1.0 + o.exp(-(mix[:, 0:4] * scale[0] + base[0:4]))) + cfg.hc_eps
        post = 2.0 / (1.0 + o.exp(-(mix[:, 4:8] * scale[1] + base[4:8])))
        c = (mix[:, 8:24] * scale[2] + base[8:24]).reshape(B, 4, 4)               # c[b, in, out]
        c = o.exp(c - o.amax(c, -1, keepdims=True))
        c = c / o.sum(c, -1, keepdims=True) + cfg.hc_eps
        c = c / (o.sum(c, -2, keepdims=True) + cfg.hc_eps)
        for _ in range(cfg.sinkhorn_iters - 1):
            c = c / (o.sum(c, -1, keepdims=True) + cfg.hc_eps)
            c = c / (o.sum(c, -2, keepdims=True) + cfg.hc_eps)
        x_in = o.bf16(o.sum(pre.reshape(B, 4, 1) * X, 1))
        return x_in, post, c

    def _hc_post(self, y, X, post, comb):
        """``X_new[:, j] = post[:, j] y + sum_i comb[:, i, j] X[:, i]`` (float32)."""
        o = self.ops
        B = X.shape[0]
        return post.reshape(B, 4, 1) * o.f32(y).reshape(B, 1, -1) + o.matmul(o.transpose(comb, (0, 2, 1)), X)

    # -- attention block ------------------------------------------------------------------------

    def _compress(self, kv_in, sc_in, ape, norm, pos_h, kv_state, score_state, R, d):
        """One compressor decode step (in place): writes this token's inputs into the state and,
        when some sequences complete a window, returns ``(rows, positions, seqs)``: the emitted
        bf16 rows ``[n, d]``, the host positions of their tokens and the sequences; else None."""
        o = self.ops
        B = kv_in.shape[0]
        r_h = pos_h % R
        b = o.arange(B)
        at = o.index(R + r_h if R == 4 else r_h)
        kv_state[b, at] = o.f32(kv_in)
        score_state[b, at] = o.f32(sc_in) + ape[o.index(r_h)]
        em_h = np.flatnonzero((pos_h + 1) % R == 0)
        if em_h.size == 0:
            return None
        em = o.index(em_h)
        if R == 4:  # the previous window's first halves and this window's second halves
            K = o.concat([kv_state[em, 0:4, :d], kv_state[em, 4:8, d:]], 1)
            S = o.concat([score_state[em, 0:4, :d], score_state[em, 4:8, d:]], 1)
            kv_state[em, 0:4] = kv_state[em, 4:8]
            score_state[em, 0:4] = score_state[em, 4:8]
        else:
            K, S = kv_state[em], score_state[em]
        e = o.exp(S - o.amax(S, 1, keepdims=True))
        pooled = o.sum(e * K, 1) / o.sum(e, 1)                                    # [n, d]
        rp = o.index(pos_h[em_h] + 1 - R)
        row = self._rope_tail(self._rms(pooled, norm), self.cos[rp], self.sin[rp])
        return o.bf16(row), pos_h[em_h], em_h

    def _indexer(self, qr, x, pc, ps, pos_h):
        """The indexer's columns ``[B, index_topk]`` (int64, -1 padding) of every sequence."""
        o, cfg, a = self.ops, self.cfg, self.a
        B, k = x.shape[0], cfg.index_topk
        iq = o.linear(qr, a["i_wq_b"]).reshape(B, INDEX_HEADS, INDEX_DIM)
        iq = o.bf16(self._rope_tail(iq, pc, ps))
        iw = o.linear(x, a["i_wproj"]) * float((INDEX_DIM * INDEX_HEADS) ** -0.5)
        out = self._compress(o.linear(x, a["i_wkv"], True), o.linear(x, a["i_wgate"], True), a["i_ape"], a["i_norm"],
                             pos_h, self.index_comp[0], self.index_comp[1], 4, INDEX_DIM)
        if out is not None:
            rows, p_em, em_h = out
            self.index_keys[o.index(em_h), o.index(p_em // 4)] = rows
        lengths = (pos_h + 1) // 4
        C = int(lengths.max())
        if C == 0:
            return o.full((B, k), -1, o.i64_t)
        keys = self.index_keys[:, :C]                                             # [B, C, 128] bf16
        s = o.bmm(iq, o.transpose(keys, (0, 2, 1)))                               # [B, 64, C]
        score = o.sum(o.maximum(s, 0.0) * iw.reshape(B, INDEX_HEADS, 1), 1)       # [B, C]
        score = o.where(o.arange(C).reshape(1, C) < o.index(lengths).reshape(B, 1), score, float("-inf"))
        kk = min(k, C)
        vals, top = o.topk(score, kk)
        top = o.where(vals > float("-inf"), top, -1)
        if kk < k:
            top = o.concat([top, o.full((B, k - kk), -1, o.i64_t)], 1)
        return top

    def _attend(self, q, idx, pc, ps):
        """Sparse attention of ``q`` bf16 ``[B, H, 512]`` over the pool slots ``idx`` ``[B, K]``
        (-1: none) with the sink, then the inverse RoPE: bf16 ``[B, H, 512]``."""
        o = self.ops
        valid = idx >= 0
        rows = self.pool[o.where(valid, idx, 0)]                                  # [B, K, 512] bf16
        s = o.bmm(q, o.transpose(rows, (0, 2, 1))) * float(HEAD_DIM ** -0.5)     # [B, H, K]
        s = o.where(valid.reshape(idx.shape[0], 1, idx.shape[1]), s, float("-inf"))
        m = o.amax(s, -1, keepdims=True)
        e = o.exp(s - m)
        den = o.sum(e, -1, keepdims=True) + o.exp(self.a["sink"].reshape(1, -1, 1) - m)
        out = o.matmul(e, o.f32(rows)) / den
        return o.bf16(self._rope_tail(out, pc, ps, inverse=True))

    def attention(self, X, pos_h, pos):
        o, cfg, a, r = self.ops, self.cfg, self.a, self.ratio
        B, H, W = X.shape[0], cfg.heads, cfg.window
        pc, ps = self.cos[pos], self.sin[pos]
        x_in, post, comb = self._hc_pre(X, a["hc_fn"], a["hc_scale"], a["hc_base"])
        x = o.bf16(self._rms(x_in, a["attn_norm"]))
        qr = o.bf16(self._rms(o.linear(x, a["wq_a"]), a["q_norm"]))
        q = self._rms(o.linear(qr, a["wq_b"]).reshape(B, H, HEAD_DIM), None)
        q = o.bf16(self._rope_tail(q, pc, ps))
        kv = o.bf16(self._rope_tail(self._rms(o.linear(x, a["wkv"]), a["kv_norm"]), pc, ps))
        b = o.arange(B)
        self.pool[self.ring_base + b * W + pos % W] = kv
        selected = None
        if r == 4:
            selected = self._indexer(qr, x, pc, ps, pos_h)
        if r:
            out = self._compress(o.linear(x, a["c_wkv"], True), o.linear(x, a["c_wgate"], True), a["c_ape"],
                                 a["c_norm"], pos_h, self.comp[0], self.comp[1], r, HEAD_DIM)
            if out is not None:
                rows, p_em, em_h = out
                self.pool[o.index(em_h * self.rows + p_em // r)] = rows
        # slots: the window (positions p - 127 .. p), then the compressed rows
        qp = pos.reshape(B, 1) - (W - 1) + o.arange(W).reshape(1, W)
        idx = o.where(qp >= 0, self.ring_base + b.reshape(B, 1) * W + qp % W, -1)
        base = b.reshape(B, 1) * self.rows
        if r == 4:
            idx = o.concat([idx, o.where(selected >= 0, selected + base, -1)], 1)
        elif r:
            width = max(1, int(pos_h.max() + 1) // r)
            c = o.arange(width).reshape(1, width)
            idx = o.concat([idx, o.where(c < ((pos + 1) // r).reshape(B, 1), c + base, -1)], 1)
        att = self._attend(q, idx, pc, ps)                                        # [B, H, 512] bf16
        G, R = cfg.o_groups, cfg.o_lora_rank
        og = o.transpose(att.reshape(B, G, cfg.group_width), (1, 0, 2))           # [G, B, gw]
        z = o.bmm(og, o.transpose(a["wo_a"], (0, 2, 1)), True)                    # [G, B, R] bf16
        z = o.transpose(z, (1, 0, 2)).reshape(B, G * R)
        y = o.linear(z, a["wo_b"], True)                                          # [B, D] bf16
        self.last_selected = selected
        return self._hc_post(y, X, post, comb)

    # -- MoE block ------------------------------------------------------------------------------

    def _mlp(self, x, wg, wu, wd):
        """Clamped SwiGLU MLP of bf16 rows ``x``: bf16 rows."""
        o, lim = self.ops, float(self.cfg.swiglu_limit)
        g = o.minimum(o.linear(x, wg), lim)
        u = o.clip(o.linear(x, wu), -lim, lim)
        h = o.bf16(g / (1.0 + o.exp(-g)) * u)
        return o.linear(h, wd, True)

    def _sqrtsoftplus(self, x):
        o = self.ops
        return o.sqrt(o.where(x > 20.0, x, o.log1p(o.exp(o.minimum(x, 20.0)))))

    def moe(self, X, tok):
        if self.m is None:
            raise ValueError("this composite was built with moe=None: the attention block alone")
        o, cfg, w = self.ops, self.cfg, self.m
        N, k, D = X.shape[0], cfg.experts_per_token, cfg.dim
        x_in, post, comb = self._hc_pre(X, w["hc_fn"], w["hc_scale"], w["hc_base"])
        xb = o.bf16(self._rms(x_in, w["ffn_norm"]))
        logits = o.linear(xb, w["gate"])                                          # [N, E] float32
        if self.hash:
            idx = o.index(w["tid2eid"][tok])
            s = self._sqrtsoftplus(o.take_along(logits, idx))
        else:
            s_all = self._sqrtsoftplus(logits)
            _, idx = o.topk(s_all + w["bias"], k)
            s = o.take_along(s_all, idx)
        wts = s / (o.sum(s, -1, keepdims=True) + 1e-20) * float(cfg.route_scale) if k > 1 else \
            s * float(cfg.route_scale)
        self.last_indices = idx
        # routed experts: a loop over the touched experts (their ids on the host)
        e_h = o.to_host(idx).reshape(-1).astype(np.int64) % self.resident
        ys = o.zeros((N * k, D), o.f32_t)
        for e in np.unique(e_h):
            flat_h = np.flatnonzero(e_h == e)
            flat = o.index(flat_h)
            ye = self._mlp(xb[flat // k], w["w_gate"][int(e)], w["w_up"][int(e)], w["w_down"][int(e)])
            ys[flat] = o.f32(ye)
        routed = o.sum(wts.reshape(N, k, 1) * ys.reshape(N, k, D), 1)
        shared = self._mlp(xb, w["s_gate"][0], w["s_up"][0], w["s_down"][0])
        y = o.bf16(routed + o.f32(shared))
        return self._hc_post(y, X, post, comb)

    # -- the layer ------------------------------------------------------------------------------

    def decode(self, X, token_ids, positions):
        """One decode step of the layer: ``X_new`` float32 ``[B, 4, D]`` of the streams ``X``; advances
        this object's state.  ``positions`` (host or device ints ``[B]``) must be each sequence's
        next position; ``token_ids`` ``[B]`` are needed on hash-routed layers."""
        o = self.ops
        pos_h = np.asarray(_host(positions)).astype(np.int64)
        if pos_h.shape != (self.batch,) or (pos_h != self.next_pos).any():
            raise ValueError(f"positions must be the next positions {self.next_pos.tolist()}, got {pos_h.tolist()}")
        if (pos_h >= self.cfg.max_context).any():
            raise ValueError(f"positions beyond max_context {self.cfg.max_context}")
        pos = o.index(pos_h)
        tok = None if token_ids is None else o.index(token_ids)
        X = o.f32(o.asarray(X))
        X = self.attention(X, pos_h, pos)
        X = self.moe(X, tok)
        self.next_pos = pos_h + 1
        return X


class TorchCompositeModel:
    """The composite of every layer of a ds4kern :class:`~ds4kern.models.deepseek_v4.model.Model`
    (its weights shared through ``ops.asarray``, its states copied as they are now) and a decode
    step from the token embeddings, as ``decode_step`` does."""

    def __init__(self, model, ops):
        self.cfg, self.ops = model.cfg, ops
        self.embed = ops.asarray(model.embed)
        self.layers = [TorchCompositeLayer(model.cfg, l.attn, l.moe, l.state, ops) for l in model.layers]

    def embed_tokens(self, tok):
        o = self.ops
        x = o.f32(self.embed[tok])
        return o.stack([x, x, x, x], 1)

    def step(self, token_ids, positions):
        o = self.ops
        tok = o.index(token_ids)
        X = self.embed_tokens(tok)
        for layer in self.layers:
            X = layer.decode(X, tok, positions)
        return X


# -- comparison helpers (CPU test and main) ---------------------------------------------------------


def _sets(a, row):
    a = np.asarray(a)
    return set(a[row][a[row] >= 0].tolist())


def same_choices(ours_indices, ours_selected, comp: TorchCompositeLayer) -> np.ndarray:
    """bool ``[B]``: whether each token's experts and (CSA) indexer columns are the same sets in
    ds4kern's step and the composite's last step."""
    o = comp.ops
    ci = o.to_host(comp.last_indices)
    oi = _host(ours_indices)
    cs = None if comp.last_selected is None else o.to_host(comp.last_selected)
    os_ = None if ours_selected is None else _host(ours_selected)
    out = []
    for t in range(ci.shape[0]):
        ok = _sets(ci, t) == _sets(oi, t)
        if cs is not None or os_ is not None:
            ok = ok and cs is not None and os_ is not None and _sets(cs, t) == _sets(os_, t)
        out.append(ok)
    return np.array(out, bool)


def row_errors(got, want) -> np.ndarray:
    """Per token: max |got - want| over its streams, relative to the largest |want| of the call."""
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    return np.abs(g - w).reshape(g.shape[0], -1).max(axis=1) / max(float(np.abs(w).max()), 1e-30)


# -- the GPU benchmark ------------------------------------------------------------------------------


def _median_wall(fn, sync, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_batch(cfg: Config, B: int, context: int, layers: int, steps: int, warmup: int, resident=None,
                seed: int = 0) -> dict:
    """One row of the table: check one step layer by layer, then time ds4kern (plain calls and
    graph replay) and the torch composite, each from its own copy of the same state."""
    import cupy as cp
    import torch

    from ds4kern.models.deepseek_v4.attention import attention_decode
    from ds4kern.models.deepseek_v4.model import Model, StepGraph, decode_step
    from ds4kern.models.deepseek_v4.moe import moe_block

    model = Model.random(cfg, B, layers=layers, xp=cp, seed=seed, resident=resident)
    positions = np.maximum(context - 7 * (np.arange(B) % 4), 0)
    for l in model.layers:
        l.state.fill_random(positions, seed)
    cp.cuda.get_current_stream().synchronize()
    ops = TorchOps()
    comp = TorchCompositeModel(model, ops)  # weights zero-copy, states cloned
    torch.cuda.synchronize()
    rng = np.random.default_rng((seed, 13))

    def tokens():
        return rng.integers(0, cfg.vocab, size=B).astype(np.int32)

    row = {"B": B, "context": context, "layers": layers, "mixed_out": ops.mixed_out}
    # 1. one step layer by layer: the same X into both, ds4kern's output goes on
    tok = tokens()
    pos = model.layers[0].state.next_pos.copy()
    X = model.embed_tokens(cp.asarray(tok))
    worst, agree, per_layer = 0.0, np.ones(B, bool), []
    for i, (l, c) in enumerate(zip(model.layers, comp.layers)):
        Xt = c.decode(ops.asarray(X), ops.index(tok), pos)
        Xd = attention_decode(cfg, l.attn, l.state, X, pos)
        t = {}
        Xd = moe_block(cfg, l.moe, Xd, cp.asarray(tok), layer=i, trace=t)
        cp.cuda.get_current_stream().synchronize()
        torch.cuda.synchronize()
        same = same_choices(t["indices"], l.state.last_selected, c)
        err = row_errors(ops.to_host(Xt), _host(Xd))
        lw = float(err[same].max()) if same.any() else float("nan")
        per_layer.append((cfg.kind(i), float(same.mean()), lw))
        worst = max(worst, lw) if same.any() else worst
        agree &= same
        X = Xd
    row.update(check_worst=worst, agree=float(agree.mean()), per_layer=per_layer)
    # 2. timing, ours: plain calls, then graph replay
    sync_cp = cp.cuda.get_current_stream().synchronize

    def ours():
        decode_step(model, tokens(), model.layers[0].state.next_pos.copy())

    _median_wall(ours, sync_cp, warmup)
    row["ours_s"] = _median_wall(ours, sync_cp, steps)
    try:
        g = StepGraph(model, horizon=2 * steps + 2, restore=False)

        def graph():
            g.step(tokens(), model.layers[0].state.next_pos.copy())

        _median_wall(graph, sync_cp, 1)
        row["graph_s"] = _median_wall(graph, sync_cp, steps)
        g = None  # the graph's buffers go back to CuPy's pool before the torch timing
    except Exception as e:  # reported, not fatal
        row["graph_error"] = f"{type(e).__name__}: {e}"
        cp.cuda.get_current_stream().synchronize()
    # 3. timing, the torch composite
    def eager():
        comp.step(tokens(), comp.layers[0].next_pos.copy())

    _median_wall(eager, ops.sync, warmup)
    row["torch_s"] = _median_wall(eager, ops.sync, steps)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ds4kern's DeepSeek-V4 decode step against a torch eager composite "
                                             "of the same layers on the same weights")
    ap.add_argument("--model", choices=["flash", "pro"], default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--resident", type=int, default=None, help="expert weight sets kept per layer (default all)")
    a = ap.parse_args(argv)
    import cupy as cp
    import torch

    from ds4kern.core.timing import device_name
    from ds4kern.models.deepseek_v4 import config as C

    # positions reach context + warm-up + timed steps of three runs (and the graph's horizon)
    need = a.context + 4 * (a.steps + a.warmup) + 2 * a.steps + 64
    cfg = {"flash": C.flash, "pro": C.pro}[a.model](-(-need // 512) * 512)
    print(f"device: {device_name()}; torch {torch.__version__}; {a.model}, {a.layers} layers "
          f"({', '.join(cfg.kind(i) for i in range(a.layers))}), context {a.context}, "
          f"resident {a.resident or cfg.experts}; median of {a.steps} steps after {a.warmup} warm-up")
    rows = []
    for B in a.batch:
        r = bench_batch(cfg, B, a.context, a.layers, a.steps, a.warmup, a.resident)
        rows.append(r)
        gc.collect()  # both models of this batch size are gone: give their memory back
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
        print(f"B={B}: first step layer by layer: tokens agreeing in every layer {100 * r['agree']:.0f}%, "
              f"max |diff| / max |X| over them {r['check_worst']:.2e}; per layer "
              + ", ".join(f"{k} {100 * s:.0f}% {e:.1e}" for k, s, e in r["per_layer"])
              + ("" if r["mixed_out"] else "  (torch without mm out_dtype: float32-out linears rounded to bf16)"))
    print()
    print("| B | ours (plain calls) | ours (graph replay) | torch eager | speed-up (torch / best ours) "
          "| first step: tokens agreeing, max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        best = min(r["ours_s"], r.get("graph_s", r["ours_s"]))
        g = f"{1e3 * r['graph_s']:.2f} ms" if "graph_s" in r else f"n/a ({r['graph_error'][:120]})"
        print(f"| {r['B']} | {1e3 * r['ours_s']:.2f} ms | {g} | {1e3 * r['torch_s']:.2f} ms | "
              f"{r['torch_s'] / best:.2f}x | {100 * r['agree']:.0f}%, {r['check_worst']:.1e} |")


if __name__ == "__main__":
    main()
