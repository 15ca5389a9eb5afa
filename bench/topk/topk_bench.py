"""GPU timing of topk_rows: every CUDA variant (each of its settings) and torch.topk side by side,
against the copy bandwidth measured in the same run.

    python bench/topk/topk_bench.py [--shapes 4x8192x512 8x262144x512 ...] [--json out.json]

Shapes are RxCxk.  Each timed graph call reads its own score matrix from a rotation of sets
totalling at least 256 MB (5x an H100's L2) when a matrix is large, so the large shapes come from
HBM; small matrices (R x 8192) sit in L2 whatever we do, as they do in the indexer that produces
them just before.  Times: CUDA-graph replays (``cuda_graph_time`` / ``torch_graph_time``: device
time, no host launch cost), median of many replays after warm-up; and per call with CUDA events
around the Python call (what a caller outside a graph sees, launches included).

Minimal bytes = R * C * itemsize (scores read once) + R * k * 4 (indices).  "% copy" = minimal bytes
/ time / copy bandwidth (1 GiB device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name, torch_graph_time
from ds4kern.ops.topk import topk_rows

OP = "topk_rows"
SHAPES = ["4x8192x512", "8x8192x512", "8x262144x512", "8x262144x2048", "64x65536x512", "1024x16384x512",
          "1x262144x1024"]
ROTATE_BYTES = 256 << 20


def parse(shape):
    R, C, k = (int(x) for x in shape.split("x"))
    return R, C, k


def candidates(cp, s, k):
    d = ds4kern.explain(OP, s, k)
    out = []
    for c in d.candidates:
        if c.rejected is None and c.variant.backend == "cuda":
            cfgs = c.variant.configs_for(d.problem) or [{}]
            out += [(c.variant.name, cfg) for cfg in cfgs]
    return out, d.chosen.name


def bench(shapes, json_path, repeat=50):
    import cupy as cp

    name = device_name()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for shape in shapes:
        R, C, k = parse(shape)
        nbytes = R * C * 4
        nsets = int(min(64, max(1, -(-ROTATE_BYTES // nbytes)))) if nbytes >= (4 << 20) else 4
        rs = cp.random.RandomState(1)
        sets = [rs.standard_normal((R, C), dtype=cp.float32) for _ in range(nsets)]
        out = cp.empty((R, k), np.int32)
        minimal = R * C * 4 + R * k * 4
        cands, chosen = candidates(cp, sets[0], k)
        print(f"\nR={R} C={C} k={k}: {minimal / 1e6:.2f} MB minimal, {nsets} input sets; dispatcher picks {chosen}")
        calls = [topk_rows.op.prepare(s, k, out=out) for s in sets]
        for vname, cfg in cands:
            v = registry.get(OP, vname)
            label = vname + ("[" + ",".join(f"{a}={b}" for a, b in cfg.items()) + "]" if cfg else "")
            t = cuda_graph_time(lambda j, v=v, cfg=cfg: v.fn(calls[j % nsets].args, **cfg), inner=min(20, nsets * 5),
                                repeat=repeat)
            te = cuda_time(lambda v=v, cfg=cfg: v.fn(calls[0].args, **cfg), warmup=5, repeat=repeat)
            rows.append(dict(R=R, C=C, k=k, impl=label, graph_us=t * 1e6, event_us=te * 1e6,
                             pct_copy=100 * minimal / t / bw, device=name))
            print(f"  {label:24s} {t * 1e6:9.2f} us (graph)  {te * 1e6:9.2f} us (per call)  "
                  f"{100 * minimal / t / bw:5.1f}% copy")
        try:
            import torch

            tsets = [torch.from_dlpack(s) for s in sets]
            t = torch_graph_time(lambda j: torch.topk(tsets[j % nsets], k, dim=1, sorted=True), inner=min(20, nsets * 5),
                                 repeat=repeat)
            rows.append(dict(R=R, C=C, k=k, impl="torch.topk", graph_us=t * 1e6, pct_copy=100 * minimal / t / bw,
                             device=name))
            print(f"  {'torch.topk':24s} {t * 1e6:9.2f} us (graph)  {'':22s}{100 * minimal / t / bw:5.1f}% copy")
        except Exception as e:  # pragma: no cover
            print(f"  torch.topk unavailable: {e}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=name, copy_bandwidth=bw, rows=rows), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bench(a.shapes, a.json, a.repeat)


if __name__ == "__main__":
    main()
