"""GPU timing of expert_mlp: every CUDA variant (each setting of grouped) and per-expert torch
matmuls side by side, against the copy bandwidth measured in the same run.

    python bench/expert_mlp/expert_mlp_bench.py [--model flash|pro] [--batches 1 64 256] [--topk 6]
                                               [--sets 8] [--repeat 30] [--json out.json]

Problem: B decode tokens, each routed to ``topk`` distinct experts uniformly at random, so N = B x
topk rows grouped by expert (what moe_permute produces).  Weights: random bf16, all E experts
(Flash: E = 256, D = 4096, I = 2048, 12.9 GB; Pro: E = 384, D = 7168, I = 3072, 50.7 GB, which
needs a 141 GB card).  ``--sets`` routings (fresh random x and offsets each) are rotated call by
call, so the touched experts change between calls and their weights come from HBM.

Times: grouped from CUDA-graph replays (device time, ``cuda_graph_time``) and per call with CUDA
events; naive (it copies offsets to the host: no graph) and torch per call with CUDA events
after warm-up; medians.  Bytes: the touched experts' weights, 3 D I 2 bytes each (what has to come
from HBM; x, h and out are below 1% of it at decode), plus x and out; "% copy" = those bytes /
time / copy bandwidth (1 GiB device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name, torch_time
from ds4kern.ops.expert_mlp import expert_mlp

OP = "expert_mlp"
MODELS = {"flash": (256, 4096, 2048), "pro": (384, 7168, 3072)}
LIMIT = 10.0


def device_bf16(cp, rs, shape, scale):
    """Random bf16 device array (float32 normals x scale, truncated), one leading slice at a time."""
    out = cp.empty(shape, cp.uint16)
    for i in range(shape[0]):
        f = rs.standard_normal(shape[1:], dtype=cp.float32) * cp.float32(scale)
        out[i] = (f.view(cp.uint32) >> 16).astype(cp.uint16)
    return out.view(BFLOAT16)


def routing(rng, E, B, k):
    """Row counts per expert of B tokens x k distinct experts each."""
    counts = np.zeros(E, np.int64)
    for _ in range(B):
        counts[rng.choice(E, k, replace=False)] += 1
    return counts


def candidates(args):
    d = ds4kern.explain(OP, *args)
    out = []
    for c in d.candidates:
        if c.rejected is None and c.variant.backend == "cuda":
            cfgs = c.variant.configs_for(d.problem) or [{}]
            out += [(c.variant.name, cfg) for cfg in cfgs]
    return out, d.chosen.name


def bench(model, batches, topk, nsets, repeat, json_path):
    import cupy as cp

    E, D, I = MODELS[model]
    name = device_name()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write); {model}: E={E} D={D} I={I}")
    rs = cp.random.RandomState(int.from_bytes(np.random.default_rng().bytes(4), "little"))
    w = (device_bf16(cp, rs, (E, I, D), D ** -0.5), device_bf16(cp, rs, (E, I, D), D ** -0.5),
         device_bf16(cp, rs, (E, D, I), I ** -0.5))
    rng = np.random.default_rng()
    rows = []
    for B in batches:
        sets = []
        for _ in range(nsets):
            counts = routing(rng, E, B, topk)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            N = int(offsets[-1])
            x = device_bf16(cp, rs, (N, D), 1.0)
            sets.append(dict(x=x, offsets=cp.asarray(offsets), host=offsets, touched=int((counts > 0).sum()),
                             out=cp.empty((N, D), BFLOAT16)))
        touched = statistics.mean(s["touched"] for s in sets)
        N = B * topk
        nbytes = touched * 3 * D * I * 2 + 2 * N * D * 2
        cands, chosen = candidates((sets[0]["x"], sets[0]["offsets"]) + w)
        print(f"\nB={B} x top-{topk}: N={N} rows, {touched:.1f} experts touched on average, "
              f"{nbytes / 1e9:.3f} GB minimal; dispatcher picks {chosen}")
        calls = [expert_mlp.op.prepare(s["x"], s["offsets"], *w, limit=LIMIT, out=s["out"]) for s in sets]
        for vname, cfg in cands:
            v = registry.get(OP, vname)
            label = vname + ("[" + ",".join(f"{a}={b}" for a, b in cfg.items()) + "]" if cfg else "")
            row = dict(model=model, B=B, N=N, touched=touched, bytes=nbytes, impl=label, device=name)
            if vname == "grouped":
                t = cuda_graph_time(lambda j, v=v, cfg=cfg: v.fn(calls[j % nsets].args, **cfg), inner=nsets,
                                    repeat=repeat)
                row["graph_us"] = t * 1e6
            state = {"j": 0}

            def setup(i, state=state):
                state["j"] = i % nsets

            te = cuda_time(lambda v=v, cfg=cfg, state=state: v.fn(calls[state["j"]].args, **cfg), warmup=3,
                           repeat=repeat, setup=setup)
            row["event_us"] = te * 1e6
            best = row.get("graph_us", row["event_us"]) * 1e-6
            row["pct_copy"] = 100 * nbytes / best / bw
            rows.append(row)
            g = f"{row['graph_us']:9.1f} us (graph)" if "graph_us" in row else f"{'':18s}"
            print(f"  {label:28s} {g}  {te * 1e6:9.1f} us (per call)  {nbytes / best / 1e9:7.0f} GB/s  "
                  f"{row['pct_copy']:5.1f}% copy")
        try:
            import torch
            import torch.nn.functional as F

            def bf16(a):
                return torch.from_dlpack(a.view(cp.int16)).view(torch.bfloat16)

            tw = [bf16(a) for a in w]
            tsets = [dict(x=bf16(s["x"]), host=s["host"]) for s in sets]
            state = {"j": 0}

            def torch_peer():
                s = tsets[state["j"]]
                o = s["host"]
                y = torch.empty_like(s["x"])
                for e in range(E):
                    lo, hi = int(o[e]), int(o[e + 1])
                    if hi > lo:
                        xe = s["x"][lo:hi]
                        g = (xe @ tw[0][e].T).float().clamp(max=LIMIT)
                        u = (xe @ tw[1][e].T).float().clamp(-LIMIT, LIMIT)
                        y[lo:hi] = (F.silu(g) * u).to(torch.bfloat16) @ tw[2][e].T
                return y

            t = torch_time(torch_peer, repeat=repeat, setup=lambda i: state.update(j=i % nsets))
            rows.append(dict(model=model, B=B, N=N, touched=touched, bytes=nbytes, impl="torch per expert",
                             event_us=t * 1e6, pct_copy=100 * nbytes / t / bw, device=name))
            print(f"  {'torch per expert':28s} {'':18s}  {t * 1e6:9.1f} us (per call)  {nbytes / t / 1e9:7.0f} GB/s  "
                  f"{100 * nbytes / t / bw:5.1f}% copy")
        except ImportError:
            print("  torch not installed: no torch peer")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=name, copy_bandwidth=bw, rows=rows), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="flash")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bench(a.model, a.batches, a.topk, a.sets, a.repeat, a.json)


if __name__ == "__main__":
    main()
