"""Overhead of online locality recording next to the router that feeds it.

    python bench/locality/recorder_bench.py [--tokens 4096] [--json out.json]

DeepSeek-V4-Flash router (E=256, k=6, sqrtsoftplus + bias, float32 logits, T tokens of T/4
sequences... here one decode-like batch: T sequences, one token each) timed from CUDA-graph
replays: the router alone, the router followed by LocalityRecorder.record (2 launches) on the
same stream, and record alone.  Overhead = (router + record) / router - 1.

With ``--layers L`` (e.g. 43) it also times one decode step of L layers: L routers writing their
own int32 outputs, against L routers writing into a routing-capture buffer ``[T, L, k]`` (uint8
ids and float32 weights, through their ``out=`` views: no extra kernel) followed by one
``LocalityRecorder.record_step`` over the whole buffer (2 launches per step).  Overhead = (step
with recording - step without) / step without; the baseline step is timed twice (before and
after) for drift.  ``--part P`` forces the recorder's part size (records per warp).

With ``--async-steps N`` it also times graphs of N such steps where the routers write into
``LocalityRecorder.step_buffers`` and ``record_step(..., overlap=True)`` records each step on the
recorder's own stream beside the next steps' routers (joined at the end of the graph).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
from ds4kern.core.timing import cuda_graph_time, device_name


def main(argv=None):
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--layers", type=int, default=0, help="also time a step of this many layers")
    ap.add_argument("--part", type=int, default=None, help="force records per part (LocalityRecorder plan)")
    ap.add_argument("--async-steps", type=int, default=0,
                    help="also time this many steps per graph with record_step forked onto a side stream")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    name = device_name()
    E, k = 256, 6
    rows = []
    for T in a.tokens:
        n = 8
        xs = [cp.asarray(rng.standard_normal((T, E)).astype(np.float32)) for _ in range(n)]
        bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
        w, i = cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)
        seq = cp.arange(T, dtype=cp.int32)
        pos = cp.zeros(T, cp.int32)
        rec = ds4kern.LocalityRecorder(1, E, k, max_sequences=T)

        def router(j):
            ds4kern.router_topk(xs[j % n], k, score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5,
                                out=(w, i))

        def both(j):
            router(j)
            rec.record(0, i, weights=w, positions=pos, seq_ids=seq)

        t_r = cuda_graph_time(router, inner=16)
        t_b = cuda_graph_time(both, inner=16)
        t_rec = cuda_graph_time(lambda j: rec.record(0, i, weights=w, positions=pos, seq_ids=seq), inner=16)
        row = dict(device=name, T=T, router_us=t_r * 1e6, router_plus_record_us=t_b * 1e6, record_us=t_rec * 1e6,
                   overhead_pct=100 * (t_b / t_r - 1))
        rows.append(_show(row))
        if a.layers:
            rows.append(_show(step_row(a.layers, T, E, k, rng, name, a.part)))
        if a.layers and a.async_steps:
            rows.append(_show(async_row(a.layers, T, E, k, rng, name, a.async_steps)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def _show(row):
    print(" ".join(f"{kk}={v:.3g}" if isinstance(v, float) else f"{kk}={v}" for kk, v in row.items()), flush=True)
    return row


def _step_setup(L, T, E, k, rng):
    """A decode step's inputs: L layers' logits, the router keywords (Flash: sqrtsoftplus + bias),
    one token per sequence (seq ids, positions), a recorder and a [T, L, k] capture buffer."""
    import cupy as cp

    xs = [cp.asarray(rng.standard_normal((T, E)).astype(np.float32)) for _ in range(L)]
    bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
    kw = dict(score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5)
    seq = cp.arange(T, dtype=cp.int32)
    pos = cp.zeros(T, cp.int32)
    rec = ds4kern.LocalityRecorder(L, E, k, max_sequences=T)
    cap = (cp.empty((T, L, k), cp.uint8), cp.empty((T, L, k), cp.float32))
    return xs, kw, seq, pos, rec, cap


def step_row(L, T, E, k, rng, name, part=None):
    import cupy as cp

    xs, kw, seq, pos, rec, (cap_i, cap_w) = _step_setup(L, T, E, k, rng)
    outs = [(cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)) for _ in range(L)]
    rec._records_per_part = part

    def plain(j):
        for layer in range(L):
            ds4kern.router_topk(xs[layer], k, out=outs[layer], **kw)

    def captured(j):
        for layer in range(L):
            ds4kern.router_topk(xs[layer], k, out=(cap_w[:, layer], cap_i[:, layer]), **kw)

    def recorded(j):
        captured(j)
        rec.record_step(cap_i, weights=cap_w, positions=pos, seq_ids=seq)

    t_plain = cuda_graph_time(plain, inner=4, repeat=30)
    t_cap = cuda_graph_time(captured, inner=4, repeat=30)
    t_rec = cuda_graph_time(recorded, inner=4, repeat=30)
    t_plain2 = cuda_graph_time(plain, inner=4, repeat=30)  # drift check: the baseline again
    t_only = cuda_graph_time(lambda j: rec.record_step(cap_i, weights=cap_w, positions=pos, seq_ids=seq), inner=4)
    return dict(device=name, T=T, layers=L, part=part, step_routers_us=t_plain * 1e6, step_routers_again_us=t_plain2 * 1e6,
                step_routers_capture_us=t_cap * 1e6, step_recorded_us=t_rec * 1e6, record_step_alone_us=t_only * 1e6,
                overhead_pct=100 * (t_rec / t_plain - 1))


def async_row(L, T, E, k, rng, name, n):
    """Graphs of n steps of L routers: each step's routers write into LocalityRecorder.step_buffers
    and ``record_step(..., overlap=True)`` records them on the recorder's stream beside the next
    steps' routers (joined at the end); against the same steps without recording and with
    record_step on the routers' stream."""
    xs, kw, seq, pos, rec, own = _step_setup(L, T, E, k, rng)

    def routers(ci, cw):
        for layer in range(L):
            ds4kern.router_topk(xs[layer], k, out=(cw[:, layer], ci[:, layer]), **kw)

    def step(j):
        ci, cw = rec.step_buffers(T)
        routers(ci, cw)
        rec.record_step(ci, weights=cw, positions=pos, seq_ids=seq, overlap=True)
        if j == n - 1:
            rec.join()  # the graph (and the warm-up) ends with the recorder's stream joined

    def sync_step(j):
        routers(*own)
        rec.record_step(own[0], weights=own[1], positions=pos, seq_ids=seq)

    t_plain = cuda_graph_time(lambda j: routers(*own), inner=n, repeat=20)
    t_async = cuda_graph_time(step, inner=n, repeat=20)
    t_sync = cuda_graph_time(sync_step, inner=n, repeat=20)
    t_plain2 = cuda_graph_time(lambda j: routers(*own), inner=n, repeat=20)
    return dict(device=name, T=T, layers=L, async_steps=n, step_routers_us=t_plain * 1e6,
                step_routers_again_us=t_plain2 * 1e6, step_sync_us=t_sync * 1e6, step_async_us=t_async * 1e6,
                overhead_sync_pct=100 * (t_sync / t_plain - 1), overhead_async_pct=100 * (t_async / t_plain - 1))


if __name__ == "__main__":
    main()
