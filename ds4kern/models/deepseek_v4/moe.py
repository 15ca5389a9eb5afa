"""DeepSeek-V4's MoE block, for N token rows (a decode batch or a prefill chunk alike):

    X --hc_pre--> x_in -> RMSNorm (ffn_norm) -> router logits (bf16 x @ gate.T, float32) ->
    router_topk (sqrtsoftplus + bias, scaled) or, on the first ``hash_layers`` layers,
    router_hash (token-id table) -> moe_permute (rows grouped by expert) -> expert_mlp (clamped
    SwiGLU of each touched expert) -> moe_unpermute (weighted combine) + the shared expert ->
    hc_post -> X_new

The expert input is the normed row rounded to bf16; the expert MLP rounds its intermediate to
bf16 and writes bf16 rows; the combine accumulates float32; the block output (routed + shared)
is rounded to bf16 before ``hc_post``, as the attention block's output is.  SwiGLU clamp as the
public code: ``silu(min(g, 10)) * clamp(u, -10, 10)``.

``resident`` (fewer expert weight sets than experts, for memory): expert e runs the weights of
``e % resident``; routing is over all E experts, the grouping over the resident sets.  With
``resident == experts`` (the default) nothing is folded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np

from ...core.arrays import BFLOAT16
from ...core.scope import scope
from ...ops.expert_mlp import expert_mlp
from ...ops.hyper_connections import hc_post, hc_pre
from ...ops.moe import moe_permute, moe_unpermute
from ...ops.norm import rms_norm
from ...ops.router import router_topk
from ...ops.router_hash import router_hash
from .attention import linear
from .config import Config


@dataclass
class MoeWeights:
    """One layer's MoE-block weights.  Expert matrices are bf16 arrays (what ``expert_mlp``
    takes) and so is the router gate."""

    hash: bool
    hc_fn: Any        # [24, 4D]
    hc_scale: Any     # [3]
    hc_base: Any      # [24]
    ffn_norm: Any     # [D]
    gate: Any         # bf16 [E, D]
    bias: Any         # [E] (selection only; unused on hash layers)
    w_gate: Any       # bf16 [R, I, D]  (R = resident weight sets)
    w_up: Any         # bf16 [R, I, D]
    w_down: Any       # bf16 [R, D, I]
    s_gate: Any       # bf16 [1, I, D]  shared expert
    s_up: Any         # bf16 [1, I, D]
    s_down: Any       # bf16 [1, D, I]
    tid2eid: Optional[Any] = None  # int32 [vocab, k] on hash layers

    @property
    def resident(self) -> int:
        return int(self.w_gate.shape[0])

    def to(self, xp) -> "MoeWeights":
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        return MoeWeights(**{k: (v if k == "hash" or v is None else xp.asarray(v)) for k, v in vals.items()})

    def nbytes(self) -> int:
        return sum(int(getattr(self, f.name).nbytes) for f in fields(self)
                   if f.name != "hash" and getattr(self, f.name) is not None)


def expert_bytes(cfg: Config) -> int:
    """Bytes of one routed expert's bf16 weights (gate, up, down)."""
    return 3 * cfg.moe_inter * cfg.dim * 2


def _xp(a):
    """The array library of ``a`` (numpy, or CuPy for device arrays)."""
    return np if isinstance(a, np.ndarray) else __import__("cupy")


def _rng(xp, seed):
    return np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)


def _bf16_normal(xp, rng, shape, scale):
    """bf16 ``shape`` of N(0, scale^2), made one leading slice at a time (no float32 copy of
    the whole tensor: a Flash layer's experts are 12.9 GB in bf16)."""
    out = xp.empty(shape, BFLOAT16)
    for i in range(shape[0]):
        out[i] = (rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(scale)).astype(BFLOAT16)
    return out


def hash_table(cfg: Config, seed: int = 0) -> np.ndarray:
    """A random token-id -> experts table (int32 ``[vocab, k]``), k distinct experts per token."""
    E, k = cfg.experts, cfg.experts_per_token
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, max(1, E // k) + 1, size=(cfg.vocab, k))
    steps[:, 0] = rng.integers(0, E, size=cfg.vocab)
    return (np.cumsum(steps, axis=1) % E).astype(np.int32)


def random_moe_weights(cfg: Config, layer: int, seed: int = 0, xp=np, resident: Optional[int] = None) -> MoeWeights:
    """Seeded random MoE weights of the real shapes for ``layer`` (hash-routed if it is one of the
    first ``cfg.hash_layers``), made directly by ``xp`` (numpy or cupy: the GPU makes its own, a
    Flash layer's experts do not pass through the host).  ``resident``: expert weight sets held
    (default all ``cfg.experts``).  Gate and up projections are scaled so a few activations pass
    the SwiGLU clamp."""
    E, D, I = cfg.experts, cfg.dim, cfg.moe_inter
    R = E if resident is None else int(resident)
    if isinstance(resident, bool) or not 1 <= R <= E:
        raise ValueError(f"resident must be in [1, experts={E}], got {resident!r}")
    hs = np.random.default_rng((seed, 1))
    rng = _rng(xp, seed)

    def host(a):
        return xp.asarray(a.astype(np.float32))

    gate = xp.asarray((hs.standard_normal((E, D)) / np.sqrt(D)).astype(np.float32).astype(BFLOAT16))
    w = dict(hash=cfg.is_hash(layer),
             hc_fn=host(0.02 * hs.standard_normal((24, 4 * D))),
             hc_scale=host(np.ones(3) + 0.1 * hs.random(3)),
             hc_base=host(0.1 * hs.standard_normal(24)),
             ffn_norm=host(1.0 + 0.1 * hs.standard_normal(D)),
             gate=gate, bias=host(0.1 * hs.standard_normal(E)),
             w_gate=_bf16_normal(xp, rng, (R, I, D), 3.0 / np.sqrt(D)),
             w_up=_bf16_normal(xp, rng, (R, I, D), 3.0 / np.sqrt(D)),
             w_down=_bf16_normal(xp, rng, (R, D, I), 1.0 / np.sqrt(I)),
             s_gate=_bf16_normal(xp, rng, (1, I, D), 3.0 / np.sqrt(D)),
             s_up=_bf16_normal(xp, rng, (1, I, D), 3.0 / np.sqrt(D)),
             s_down=_bf16_normal(xp, rng, (1, D, I), 1.0 / np.sqrt(I)))
    if w["hash"]:
        w["tid2eid"] = xp.asarray(hash_table(cfg, seed))
    return MoeWeights(**w)


@dataclass
class MoeHooks:
    """What a step can switch on inside the MoE block: a ``RoutingCapture`` (the router writes its
    indices into the capture buffer's rows ``capture_row ..``, in the slice of the block's
    ``layer``) and a ``LocalityRecorder`` (records the layer's routing with ``positions`` and
    ``seq_ids``, as :meth:`LocalityRecorder.record` takes them)."""

    capture: Any = None
    capture_row: int = 0
    recorder: Any = None
    positions: Any = None
    seq_ids: Any = None
    step_weights: Any = None  # [capture rows, layers, k] float32: made at the first per-step use

    @property
    def per_step(self) -> bool:
        """Capture and recorder both on: each router writes its indices and weights into the step
        buffers (the capture's and :attr:`step_weights`), and :meth:`finish_step` records every
        layer at once (the recorder's ``record_step``: two launches per step, not two per layer)."""
        return self.capture is not None and self.recorder is not None

    def weights_out(self, layer: int, rows: int):
        """The float32 ``[rows, k]`` slice of ``layer`` in :attr:`step_weights` (per-step mode)."""
        cap = self.capture
        if self.step_weights is None:
            import cupy as cp
            self.step_weights = cp.empty((cap.max_tokens, cap.num_layers, cap.topk), np.float32)
        return self.step_weights[self.capture_row:self.capture_row + rows, layer, :]

    def finish_step(self, layers: int, rows: int) -> None:
        """Per-step mode: record layers ``0 .. layers-1`` of the ``rows`` tokens just routed."""
        if not self.per_step or rows == 0 or layers == 0:
            return
        r0 = self.capture_row
        self.recorder.record_step(self.capture.buffer[r0:r0 + rows, :layers],
                                  weights=self.step_weights[r0:r0 + rows, :layers],
                                  positions=self.positions, seq_ids=self.seq_ids)


def _route(cfg: Config, w: MoeWeights, logits, token_ids, layer: int, hooks: Optional[MoeHooks]):
    kw = dict(score_function="sqrtsoftplus", scaling_factor=cfg.route_scale)
    cap = hooks.capture if hooks is not None else None
    if cap is not None and hooks.per_step:
        kw["weights_out"] = hooks.weights_out(layer, int(logits.shape[0]))
    if w.hash:
        if token_ids is None:
            raise ValueError(f"layer {layer} routes by token id: token_ids are needed")
        if cap is not None:
            return cap.route_hash(layer, logits, w.tid2eid, token_ids, row=hooks.capture_row, **kw)
        return router_hash(logits, w.tid2eid, token_ids, **kw)
    if cap is not None:
        return cap.route(layer, logits, row=hooks.capture_row, expert_bias=w.bias, **kw)
    return router_topk(logits, cfg.experts_per_token, expert_bias=w.bias, **kw)


def routed_experts(cfg: Config, w: MoeWeights, xb, weights, indices):
    """The routed experts' combined output (float32 ``[N, D]``) of bf16 rows ``xb`` ``[N, D]``."""
    xp = _xp(xb)
    idx = indices.astype(np.int32)
    if w.resident < cfg.experts:
        idx = idx % np.int32(w.resident)
    with scope("permute"):
        perm = moe_permute(idx, w.resident, xb)
    with scope("experts"):
        y = expert_mlp(perm.x_perm, perm.offsets, w.w_gate, w.w_up, w.w_down, limit=cfg.swiglu_limit)
    with scope("combine"):
        out = moe_unpermute(y, perm, xp.ascontiguousarray(weights, dtype=np.float32), out_dtype=np.float32)
    return out


def shared_expert(cfg: Config, w: MoeWeights, xb):
    """The shared expert of every row (bf16 ``[N, D]``): ``expert_mlp`` with one expert."""
    xp = _xp(xb)
    offsets = xp.arange(2, dtype=np.int32) * np.int32(xb.shape[0])  # [0, N] without a host copy
    return expert_mlp(xb, offsets, w.s_gate, w.s_up, w.s_down, limit=cfg.swiglu_limit)


def moe_block(cfg: Config, w: MoeWeights, X, token_ids=None, *, layer: int = 0, hooks: Optional[MoeHooks] = None,
              trace: Optional[dict] = None):
    """The MoE block of N rows ``X`` ``[N, 4, D]`` (float32 or bf16 streams); returns ``X_new``
    ``[N, 4, D]`` in X's dtype.  ``token_ids`` (int ``[N]``) are needed on hash layers;
    ``layer`` names the layer in the capture buffer and the recorder; ``trace`` (a dict) gets
    the routing (``"weights"``, ``"indices"``) for checks."""
    if X.ndim != 3 or tuple(X.shape[1:]) != (4, cfg.dim):
        raise ValueError(f"X must have shape [N, 4, D={cfg.dim}], got {tuple(X.shape)}")
    xp = _xp(X)
    with scope("moe"):
        x_in, post, comb = hc_pre(X, w.hc_fn, w.hc_scale, w.hc_base, norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps,
                                  sinkhorn_iters=cfg.sinkhorn_iters)
        xb = rms_norm(x_in, w.ffn_norm, eps=cfg.norm_eps, out_dtype=BFLOAT16)
        with scope("router"):
            logits = linear(xp, xb, w.gate)
            weights, indices = _route(cfg, w, logits, token_ids, layer, hooks)
            if hooks is not None and hooks.recorder is not None and not hooks.per_step:
                hooks.recorder.record(layer, indices, weights=weights, positions=hooks.positions,
                                      seq_ids=hooks.seq_ids)
        if trace is not None:
            trace["weights"], trace["indices"] = weights, indices
        routed = routed_experts(cfg, w, xb, weights, indices)
        with scope("shared"):
            y = (routed + shared_expert(cfg, w, xb).astype(np.float32)).astype(BFLOAT16)
        return hc_post(y, X, post, comb)
