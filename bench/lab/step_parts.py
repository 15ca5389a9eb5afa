"""Lab: where a decode step's device time goes at small B.  For each layer kind of Flash (SWA,
CSA, HCA) and each batch, the attention block and the MoE block are each captured into a CUDA
graph on their own: the number of kernel nodes, and the median device time of graph replays
(the same step replayed: each replay rewrites the same KV slots, which costs what a real step
does).  The B = 1 step is launch-latency bound (1.83 ms for 4 layers on an H100 against ~1 ms of
weight bytes at copy rate); this says how many launches each block makes and what they cost.

    python bench/lab/step_parts.py [--batches 1 64] [--context 65536]
"""

from __future__ import annotations

import argparse

import numpy as np


def measure(fn, reset, replays: int) -> tuple:
    """(kernel nodes, median device seconds of graph replays) of ``fn()``; ``reset()`` puts the
    host-side state back after each capture (the captured call advanced it)."""
    from ds4kern.core.timing import CapturedGraph, graph_device_time

    with CapturedGraph(fn) as g:
        n = g.kernel_nodes
    reset()
    t = graph_device_time(fn, repeat=replays, inner=1)
    reset()
    return n, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--replays", type=int, default=20)
    a = ap.parse_args()
    import cupy as cp

    from ds4kern.core.timing import copy_bandwidth, device_name
    from ds4kern.models.deepseek_v4 import LayerState, attention_decode, flash, random_attention_weights
    from ds4kern.models.deepseek_v4.moe import moe_block, random_moe_weights

    cfg = flash(-(-(a.context + 64) // 512) * 512)
    print(f"device: {device_name()}; copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s; flash, context {a.context}")
    print(f"{'block':10s} {'kind':4s} {'B':>4s} {'kernels':>8s} {'graph us':>9s} {'us / kernel':>11s}")
    layer_of = {"swa": 0, "csa": 2, "hca": 3}
    for B in a.batches:
        for kind, layer in layer_of.items():
            w = random_attention_weights(cfg, kind, 0).to(cp)
            st = LayerState(cfg, kind, B, cp).fill_random(np.full(B, a.context), 0)
            X = cp.asarray(np.random.default_rng(0).standard_normal((B, 4, cfg.dim), dtype=np.float32))
            pos = st.next_pos.copy()
            pos_d = cp.asarray(pos)
            fn = lambda: attention_decode(cfg, w, st, X, pos, positions_device=pos_d, slot_horizon=2)  # noqa: E731
            fn()  # compiles, fills the pool
            st.next_pos = pos.copy()
            cp.cuda.get_current_stream().synchronize()
            n, t = measure(fn, lambda: setattr(st, "next_pos", pos.copy()), a.replays)
            print(f"{'attention':10s} {kind:4s} {B:4d} {n:8d} {1e6 * t:9.1f} {1e6 * t / max(n, 1):11.2f}")
            m = random_moe_weights(cfg, layer, 0, xp=cp)
            tok = cp.asarray(np.arange(B, dtype=np.int32) % cfg.vocab)
            fm = lambda: moe_block(cfg, m, X, tok, layer=layer)  # noqa: E731
            fm()
            cp.cuda.get_current_stream().synchronize()
            n, t = measure(fm, lambda: None, a.replays)
            print(f"{'moe':10s} {kind:4s} {B:4d} {n:8d} {1e6 * t:9.1f} {1e6 * t / max(n, 1):11.2f}")
            w = st = m = fn = fm = None  # (frees the layer before the next one is made)
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
