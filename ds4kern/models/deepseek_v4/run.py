"""The main job's pieces: check a model's decode steps against the float64 reference, and time a
decode step (per-op table from memory scopes, tokens per second, scope peaks)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import numpy as np

from ...core import scope
from ...core.arrays import to_host
from .config import Config
from .model import Model, StepGraph, decode_step
from .moe import MoeHooks
from .reference_moe import ReferenceModel


def check_steps(cfg: Config, batch: int, steps: int, xp=np, seed: int = 0, layers: Optional[int] = None,
                tol: float = 2e-2) -> dict:
    """Decode ``steps`` tokens of ``batch`` sequences from position 0 through ``layers`` layers and
    compare each step's streams with the float64 reference (relative to the step's largest |X|).
    Returns ``{"worst": float, "ok": bool, "steps": int, "per_step": [float]}``."""
    model = Model.random(cfg, batch, layers=layers, xp=xp, seed=seed)
    ref = ReferenceModel(model)
    rng = np.random.default_rng((seed, 11))
    per_step = []
    for p in range(steps):
        tok = rng.integers(0, cfg.vocab, size=batch).astype(np.int32)
        trace = []
        got = decode_step(model, tok, np.full(batch, p), trace=trace)
        want = ref.step(tok, trace)
        got = np.asarray(to_host(got), np.float64)
        per_step.append(float(np.abs(got - want).max() / np.abs(want).max()))
    worst = max(per_step, default=0.0)
    return {"worst": worst, "ok": bool(worst < tol), "steps": steps, "per_step": per_step}


def _sync(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def op_table(records, steps: int) -> list:
    """``[(part, seconds per step)]`` of the scopes two levels under each layer (attention parts,
    MoE parts), summed over layers, largest first."""
    tot = {}
    for r in records:
        parts = r["path"].split("/")
        if len(parts) >= 3 and parts[0] == "step" and parts[1].startswith("layer"):
            key = "/".join(parts[2:4]) if len(parts) >= 4 else parts[2]
            if len(parts) <= 4:
                tot[key] = tot.get(key, 0.0) + float(r.get("seconds", 0.0))
    # a block's own time excludes its named parts
    for blk in ("attention", "moe"):
        if blk in tot:
            tot[blk] -= sum(v for k, v in tot.items() if k.startswith(blk + "/"))
            tot[blk + " (rest)"] = tot.pop(blk)
    return sorted(((k, v / steps) for k, v in tot.items()), key=lambda kv: -kv[1])


def _recorder_step_time(hooks, layers: int, batch: int, steps: int) -> float:
    """Median device seconds of the recorder's per-step recording (``hooks.finish_step``: its two
    kernels over every layer), from CUDA-graph replays of that call alone (cost only: the replays
    record the same routing again)."""
    from ...core.timing import cuda_graph_time

    return cuda_graph_time(lambda j: hooks.finish_step(layers, batch), inner=1, repeat=max(steps, 10))


def time_step(cfg: Config, batch: int, context: int, *, layers: int, steps: int = 10, xp=np, seed: int = 0,
              resident: Optional[int] = None, graph: bool = True, hooks_factory=None, quiet: bool = True) -> dict:
    """Decode steps of ``batch`` sequences whose caches hold ``context`` tokens (random contents,
    mixed lengths near it), ``layers`` layers.  Returns step seconds (plain calls, and CUDA-graph
    replays when ``graph``: ``graph_error`` says why a capture failed), tokens/s, the per-op table
    (second pass, every scope synchronised) and the scope peaks."""
    model = Model.random(cfg, batch, layers=layers, xp=xp, seed=seed, resident=resident)
    positions = np.maximum(context - 7 * (np.arange(batch) % 4), 0)
    for l in model.layers:
        l.state.fill_random(positions, seed)
    hooks = hooks_factory(model) if hooks_factory else None
    rng = np.random.default_rng((seed, 13))

    def tokens():
        return rng.integers(0, cfg.vocab, size=batch).astype(np.int32)

    out = {"batch": batch, "context": context, "layers": layers}
    stats = scope.stats_path()
    scope.set_stats_path(None)
    times = []
    try:
        for i in range(steps + 1):  # the first step compiles the kernels
            t0 = time.perf_counter()
            decode_step(model, tokens(), model.layers[0].state.next_pos.copy(), hooks=hooks)
            _sync(xp)
            if i:
                times.append(time.perf_counter() - t0)
        out["step_s"] = float(np.median(times))
        g = None
        graph_hooks = hooks
        if hooks is not None and hooks.recorder is not None and xp is not np:
            # a graph cannot replay the recorder (host clocks): the graph step captures the routing
            # only, and the recorder's per-step kernels are timed on their own
            graph_hooks = MoeHooks(capture=hooks.capture, capture_row=hooks.capture_row) if hooks.capture else None
            if hooks.per_step:
                out["recorder_step_s"] = _recorder_step_time(hooks, layers, batch, steps)
        if graph and xp is not np:
            try:
                g = StepGraph(model, horizon=2 * steps + 2, hooks=graph_hooks, restore=False)
            except Exception as e:  # reported, not fatal: the plain-call timing stands
                out["graph_error"] = f"{type(e).__name__}: {e}"
                xp.cuda.get_current_stream().synchronize()
        if g is not None:
            gt = []
            start, stop = xp.cuda.Event(), xp.cuda.Event()
            for _ in range(steps):
                tok, pos = tokens(), model.layers[0].state.next_pos.copy()
                with g.stream:
                    start.record(g.stream)
                g.step(tok, pos)
                with g.stream:
                    stop.record(g.stream)
                stop.synchronize()
                gt.append(xp.cuda.get_elapsed_time(start, stop) * 1e-3)
            out["graph_step_s"] = float(np.median(gt))
            del g
        path = stats or tempfile.mktemp(suffix=".jsonl")
        scope.set_stats_path(path)
        scope.set_sync(True)
        for _ in range(steps):
            decode_step(model, tokens(), model.layers[0].state.next_pos.copy(), hooks=hooks)
    finally:
        scope.set_sync(False)
        scope.set_stats_path(stats)
    recs = [r for r in scope.read_stats(path) if r["path"].startswith("step")]
    if not stats:
        os.unlink(path)
    best = min(out["step_s"], out.get("graph_step_s", out["step_s"]))
    out["tokens_per_s"] = batch / best
    out["table"] = op_table(recs, steps)
    out["peaks"] = scope.summarize(recs)
    return out


def capture_hooks(cfg: Config, layers: int, capture: bool, recorder: bool):
    """A factory of :class:`MoeHooks` with a routing capture and / or a locality recorder."""
    def make(model: Model):
        cap = rec = None
        if capture:
            from ...replay import RoutingCapture
            cap = RoutingCapture(max_tokens=model.batch, num_layers=layers, topk=cfg.experts_per_token,
                                 num_experts=cfg.experts)
        if recorder:
            from ...locality.recorder import LocalityRecorder
            rec = LocalityRecorder(layers, cfg.experts, cfg.experts_per_token,
                                   hash_layers=[i for i in range(layers) if cfg.is_hash(i)])
        return MoeHooks(capture=cap, recorder=rec)
    return make
