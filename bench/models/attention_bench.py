"""DeepSeek-V4 attention block (one layer, decode) on the GPU over kinds x batches x contexts: block
time from plain calls and from CUDA-graph replays, the torch eager composite of the same block
(bench/models/torch_composite.py, same weights) and the scratch peak of the block against the
largest single part's (target: at most 1.25x, scratch reused).

    python bench/models/attention_bench.py --kinds csa hca --batches 1 64 256 --contexts 4096 65536 1048576

Memory: a CSA layer's pool at 1M tokens is 256 sequences x 262,144 rows x 1 KB = 68 GB (+ 17 GB of
indexer keys): B = 256 at 1M needs an H200; combinations that do not fit are skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np


def graph_time(cp, cfg, w, st, X, steps: int):
    """Median device seconds of one block from CUDA-graph replays (the state advances by steps)."""
    from ds4kern.models.deepseek_v4 import attention_decode

    s = cp.cuda.Stream(non_blocking=True)
    pos_d = cp.asarray(st.next_pos)
    with s:
        attention_decode(cfg, w, st, X, st.next_pos.copy(), positions_device=pos_d, slot_horizon=steps + 2)
        pos0 = st.next_pos.copy()
        pos_d.set(pos0)
        s.synchronize()
        s.begin_capture()
        try:
            attention_decode(cfg, w, st, X, pos0, positions_device=pos_d, slot_horizon=steps + 2)
        finally:
            g = s.end_capture()
        st.next_pos = pos0.copy()  # the capture ran nothing on the device
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(steps):
            pos_d.set(st.next_pos)
            start.record(s)
            g.launch(s)
            stop.record(s)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
            st.next_pos = st.next_pos + 1
    return float(np.median(times))


def torch_time(cp, cfg, w, st, X, steps: int):
    """Median wall seconds of the torch eager composite of the same block (same weights, zero-copy;
    its own copy of the state), called at the state's next positions (each call rewrites the same
    slots, as a repeated decode of one token would)."""
    import sys
    import time

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_composite import TorchCompositeLayer, TorchOps

    ops = TorchOps()
    comp = TorchCompositeLayer(cfg, w, None, st, ops)
    Xt = ops.asarray(X)
    pos_h = st.next_pos.astype(np.int64).copy()
    pos = ops.index(pos_h)
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        comp.attention(Xt, pos_h, pos)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del comp
    torch.cuda.empty_cache()
    return float(np.median(times))


def one(cp, kind: str, B: int, context: int, steps: int, seed: int = 0, torch_too: bool = True) -> dict:
    import time

    from ds4kern.core import scope
    from ds4kern.models.deepseek_v4 import LayerState, attention_decode, flash, random_attention_weights

    cfg = flash(-(-(context + 2 * steps + 8) // 512) * 512)
    w = random_attention_weights(cfg, kind, seed).to(cp)
    st = LayerState(cfg, kind, B, cp).fill_random(np.full(B, context), seed)
    X = cp.asarray(np.random.default_rng(seed).standard_normal((B, 4, cfg.dim), dtype=np.float32))
    row = {"kind": kind, "B": B, "context": context}
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        attention_decode(cfg, w, st, X, st.next_pos.copy())
        cp.cuda.get_current_stream().synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    row["plain_s"] = float(np.median(times))
    try:
        row["graph_s"] = graph_time(cp, cfg, w, st, X, steps)
    except Exception as e:  # reported, not fatal
        row["graph_error"] = f"{type(e).__name__}: {e}"
        cp.cuda.get_current_stream().synchronize()
    if torch_too:
        try:
            row["torch_s"] = torch_time(cp, cfg, w, st, X, steps)
        except Exception as e:  # reported, not fatal (memory at the largest shapes)
            row["torch_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        cp.cuda.get_current_stream().synchronize()
    path = tempfile.mktemp(suffix=".jsonl")
    scope.set_stats_path(path)
    try:
        attention_decode(cfg, w, st, X, st.next_pos.copy())
    finally:
        scope.set_stats_path(None)
    recs = scope.summarize(scope.read_stats(path))
    os.unlink(path)
    blk = next(r for r in recs if r["path"] == "attention")
    parts = [r for r in recs if r["path"].startswith("attention/")]
    row["block_scratch"] = blk["peak_above_entry"]
    row["largest_part"] = max((r["peak_above_entry"] for r in parts), default=0)
    row["largest_part_name"] = max(parts, key=lambda r: r["peak_above_entry"])["path"] if parts else ""
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kinds", nargs="+", default=["csa", "hca"], choices=["csa", "hca", "swa"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 1048576])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch eager composite of the block")
    a = ap.parse_args()
    import gc

    import cupy as cp

    from ds4kern.core.timing import copy_bandwidth, device_name
    from ds4kern.models.deepseek_v4 import flash
    from ds4kern.models.deepseek_v4.model import layer_bytes

    free = cp.cuda.runtime.memGetInfo()[0]
    print(f"device: {device_name()}; copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s; {free / 2**30:.0f} GiB free")
    print(f"{'kind':4s} {'B':>4s} {'context':>8s} {'plain ms':>9s} {'graph ms':>9s} {'scratch MiB':>11s} "
          f"{'largest part MiB':>16s} {'ratio':>6s} {'torch ms':>9s} {'torch/best':>10s}")
    rows = []
    for kind in a.kinds:
        for ctx in a.contexts:
            for B in a.batches:
                cfg = flash(-(-(ctx + 2 * a.steps + 8) // 512) * 512)
                layer = 2 if kind == "csa" else 3 if kind == "hca" else 0
                need = layer_bytes(cfg, layer, B)["state"] + 2 ** 30
                if need > 0.9 * cp.cuda.runtime.memGetInfo()[0]:
                    print(f"{kind:4s} {B:4d} {ctx:8d}  skipped: the state needs {need / 2**30:.0f} GiB")
                    continue
                # the torch composite copies the state: only where two copies fit
                torch_too = not a.no_torch and 2 * need < 0.9 * cp.cuda.runtime.memGetInfo()[0]
                r = one(cp, kind, B, ctx, a.steps, torch_too=torch_too)
                rows.append(r)
                g = f"{1e3 * r['graph_s']:9.3f}" if "graph_s" in r else f"{'n/a':>9s}"
                ratio = r["block_scratch"] / max(r["largest_part"], 1)
                best = min(r["plain_s"], r.get("graph_s", r["plain_s"]))
                t = (f"{1e3 * r['torch_s']:9.3f} {r['torch_s'] / best:9.1f}x" if "torch_s" in r else
                     f"{'n/a':>9s} {'':>10s}" + (f"  torch: {r['torch_error']}" if "torch_error" in r else
                                                  "  torch: skipped (two copies of the state do not fit)"))
                print(f"{kind:4s} {B:4d} {ctx:8d} {1e3 * r['plain_s']:9.3f} {g} {r['block_scratch'] / 2**20:11.1f} "
                      f"{r['largest_part'] / 2**20:16.1f} {ratio:6.2f} {t}" +
                      (f"  graph: {r['graph_error']}" if "graph_error" in r else ""))
                gc.collect()
                cp.get_default_memory_pool().free_all_blocks()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
