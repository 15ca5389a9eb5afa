"""DeepSeek-V4 decode step (attention + MoE blocks of the first L layers) on the GPU: step time
(plain calls and CUDA-graph replay), tokens/s, per-op table, memory-scope peaks, for several
batch sizes at one context; optionally (--hooks) the cost of routing capture (in the graph step)
and of the locality recorder (its per-step kernels timed on their own: a graph cannot replay it).

    python bench/models/step_bench.py --batches 1 64 256 --context 65536 --layers 4
"""

from __future__ import annotations

import argparse
import gc
import json



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["flash", "pro"], default="flash")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resident", type=int, default=None)
    ap.add_argument("--hooks", action="store_true", help="also time with routing capture + locality recorder on")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import cupy as cp

    from ds4kern.core.timing import copy_bandwidth, device_name
    from ds4kern.models.deepseek_v4 import config as C
    from ds4kern.models.deepseek_v4.run import capture_hooks, time_step

    cfg = {"flash": C.flash, "pro": C.pro}[a.model](-(-(a.context + 4 * a.steps + 64) // 512) * 512)
    bw = copy_bandwidth()
    print(f"device: {device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s; {a.model}, {a.layers} layers "
          f"({', '.join(cfg.kind(i) for i in range(a.layers))}), context {a.context}, resident {a.resident or cfg.experts}")
    rows = []
    for B in a.batches:
        for hooked in ([False, True] if a.hooks else [False]):
            hf = capture_hooks(cfg, a.layers, True, True) if hooked else None
            r = time_step(cfg, B, a.context, layers=a.layers, steps=a.steps, xp=cp, resident=a.resident,
                          hooks_factory=hf)
            r["hooks"] = hooked
            rows.append(r)
            g = r.get("graph_step_s", float("nan"))
            print(f"\nB={B}{' +capture+recorder' if hooked else ''}: step {1e3 * r['step_s']:.3f} ms plain, "
                  f"{1e3 * g:.3f} ms graph{' (with capture)' if hooked else ''}; {r['tokens_per_s']:.0f} tokens/s"
                  + (f" (graph capture failed: {r['graph_error']})" if r.get("graph_error") else ""))
            if hooked and "recorder_step_s" in r:
                base = next((x for x in rows if x["batch"] == B and not x["hooks"]), None)
                rec = r["recorder_step_s"]
                line = f"  recorder (record_step, every layer): {1e6 * rec:.1f} us per step"
                if base and "graph_step_s" in base and "graph_step_s" in r:
                    b, c = base["graph_step_s"], r["graph_step_s"]
                    line += (f"; capture {1e6 * (c - b):+.1f} us (graph, with vs without); capture + recorder "
                             f"{100 * (c - b + rec) / b:+.2f}% of the step (target <= 1%)")
                print(line)
            whole = sum(v for _, v in r["table"]) or 1.0
            for k, v in r["table"][:14]:
                print(f"  {k:34s} {1e3 * v:9.3f} ms {100 * v / whole:5.1f}%")
            step = next((p for p in r["peaks"] if p["path"] == "step"), None)
            parts = [p for p in r["peaks"] if p["path"].count("/") >= 2]
            if step:
                big = max(parts, key=lambda p: p["peak_above_entry"], default=None)
                ratio = step["peak_above_entry"] / max(big["peak_above_entry"], 1) if big else float("nan")
                print(f"  step scratch: peak {step['peak_above_entry'] / 2**20:.1f} MiB above the weights and caches "
                      f"(CuPy pool bytes in use at entry {(step['peak_bytes'] - step['peak_above_entry']) / 2**30:.2f} GiB); "
                      f"largest single part {big['path'] if big else '-'} "
                      f"{(big['peak_above_entry'] if big else 0) / 2**20:.1f} MiB: ratio {ratio:.2f} (target <= 1.25)")
            gc.collect()
            cp.get_default_memory_pool().free_all_blocks()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"copy_bw": bw, "rows": [{k: v for k, v in r.items() if k != "peaks"} for r in rows]}, f,
                      indent=1, default=float)


if __name__ == "__main__":
    main()
