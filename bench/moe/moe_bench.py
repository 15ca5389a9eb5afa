"""GPU timing of moe_permute and moe_unpermute: every CUDA variant and a torch peer side by side,
against the copy bandwidth measured in the same run.

    python bench/moe/moe_bench.py [--shapes 16384x6x256x4096 1x6x256x4096 ...] [--dtype bfloat16] [--json out.json]

Shapes are TxkxExD.  Inputs are fresh random routings (k distinct experts per token, uniform)
and normal rows.  Times: CUDA-graph replays (``cuda_graph_time`` / ``torch_graph_time``: device
time, no host launch cost), median of many replays after warm-up; and per call with CUDA events
around the Python call (what a caller outside a graph sees, launches included).  Large shapes
rotate input sets totalling at least 256 MB (5x an H100's L2) so their rows come from HBM.

Minimal bytes (n = T * k entries, N of them routed, s = itemsize):
  moe_permute:   4 n (indices) + 8 n (order, slot) + 8 E (counts, offsets) + T D s (x read once) + N D s (x_perm)
  moe_unpermute: 8 n (slot, weights) + N D s (y_perm) + T D s_out (out)
"% copy" = minimal bytes / time / copy bandwidth (1 GiB device-to-device copy, bytes read + written).

torch peers: permute = ``torch.sort(indices.view(-1), stable=True)`` + ``bincount`` + a row
gather ``x[order // k]``; unpermute (the order given) = ``index_add_`` of the weighted rows
(float32 accumulation through atomics: neither deterministic nor in the same summation order).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
import ds4kern.ops.moe  # noqa: F401  (registers the ops)
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name, torch_graph_time
from ds4kern.ops.moe import moe_permute, moe_unpermute

SHAPES = ["1x6x256x4096", "64x6x256x4096", "256x6x256x4096", "1024x6x256x4096", "4096x6x256x4096",
          "16384x6x256x4096", "16384x6x384x7168"]
ROTATE_BYTES = 256 << 20
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def parse(shape):
    T, k, E, D = (int(v) for v in shape.split("x"))
    return T, k, E, D


def candidates(op, *args):
    d = ds4kern.explain(op, *args)
    return [c.variant.name for c in d.candidates if c.rejected is None and c.variant.backend == "cuda"], d.chosen.name


def routing(cp, rs, T, k, E):
    """k distinct uniform experts per token (int32 [T, k]) on the device."""
    keys = rs.random_sample((T, E), dtype=cp.float32)
    return cp.argsort(keys, axis=1)[:, :k].astype(cp.int32)


def line(rows, label, t, te, minimal, bw, **extra):
    rows.append(dict(impl=label, graph_us=t * 1e6, event_us=None if te is None else te * 1e6,
                     pct_copy=100 * minimal / t / bw, **extra))
    per_call = f"{te * 1e6:9.2f} us (per call)" if te is not None else " " * 22
    print(f"  {label:28s} {t * 1e6:9.2f} us (graph)  {per_call}  {100 * minimal / t / bw:5.1f}% copy")


def bench(shapes, dtype, json_path, repeat=50):
    import cupy as cp

    from ds4kern.core.arrays import BFLOAT16

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    item = np.dtype(dt).itemsize
    name = device_name()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write); rows {dtype}")
    rows = []
    for shape in shapes:
        T, k, E, D = parse(shape)
        n = T * k
        set_bytes = (T + n) * D * item
        nsets = int(min(16, max(1, -(-ROTATE_BYTES // set_bytes)))) if set_bytes >= (4 << 20) else 4
        rs = cp.random.RandomState(1)
        idx = [routing(cp, rs, T, k, E) for _ in range(nsets)]
        xs = [rs.standard_normal((T, D), dtype=cp.float32).astype(dt) for _ in range(nsets)]
        w = rs.random_sample((T, k), dtype=cp.float32)
        outs = [moe_permute(idx[j], E, xs[j]) for j in range(nsets)]
        ys = [o.x_perm for o in outs]  # stand-in expert outputs: the permuted rows themselves
        comb = cp.empty((T, D), dt)
        common = dict(T=T, k=k, E=E, D=D, dtype=dtype, device=name)

        minimal = 12 * n + 8 * E + (T + n) * D * item
        names, chosen = candidates("moe_permute", idx[0], E, xs[0])
        print(f"\nmoe_permute T={T} k={k} E={E} D={D}: {minimal / 1e6:.2f} MB minimal, {nsets} input sets; "
              f"dispatcher picks {chosen}")
        calls = [moe_permute.op.prepare(idx[j], E, xs[j], out=outs[j]) for j in range(nsets)]
        for vname in names:
            v = registry.get("moe_permute", vname)
            t = cuda_graph_time(lambda j, v=v: v.fn(calls[j % nsets].args), inner=min(20, nsets * 5), repeat=repeat)
            te = cuda_time(lambda v=v: v.fn(calls[0].args), warmup=5, repeat=repeat)
            line(rows, vname, t, te, minimal, bw, op="moe_permute", **common)

        minimal_u = 8 * n + n * D * item + T * D * item
        print(f"moe_unpermute T={T} k={k} D={D}: {minimal_u / 1e6:.2f} MB minimal")
        ucalls = [moe_unpermute.op.prepare(ys[j], outs[j], w, out=comb) for j in range(nsets)]
        names_u, _ = candidates("moe_unpermute", ys[0], outs[0], w)
        for vname in names_u:
            v = registry.get("moe_unpermute", vname)
            t = cuda_graph_time(lambda j, v=v: v.fn(ucalls[j % nsets].args), inner=min(20, nsets * 5), repeat=repeat)
            te = cuda_time(lambda v=v: v.fn(ucalls[0].args), warmup=5, repeat=repeat)
            line(rows, vname, t, te, minimal_u, bw, op="moe_unpermute", **common)
        try:
            import torch

            t_idx = [torch.from_dlpack(a) for a in idx]
            t_x = [torch.from_dlpack(a.view(cp.uint16) if item == 2 else a) for a in xs]
            t_y = [torch.from_dlpack(a.view(cp.uint16) if item == 2 else a) for a in ys]
            tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
            if item == 2:
                t_x = [a.view(tdt) for a in t_x]
                t_y = [a.view(tdt) for a in t_y]
            t_w = torch.from_dlpack(w)

            def torch_permute(j):
                flat = t_idx[j % nsets].view(-1)
                _, order = torch.sort(flat, stable=True)
                torch.bincount(flat, minlength=E)
                return t_x[j % nsets][order // k]

            t_order = [torch.sort(a.view(-1), stable=True)[1] for a in t_idx]  # the permutation, given

            def torch_unpermute(j):
                order = t_order[j % nsets]
                out = torch.zeros((T, D), dtype=torch.float32, device=t_w.device)
                out.index_add_(0, order // k, t_y[j % nsets].float() * t_w.view(-1)[order, None])
                return out.to(tdt)

            t = torch_graph_time(torch_permute, inner=min(20, nsets * 5), repeat=repeat)
            line(rows, "torch sort + gather", t, None, minimal, bw, op="moe_permute", **common)
            t = torch_graph_time(torch_unpermute, inner=min(20, nsets * 5), repeat=repeat)
            line(rows, "torch sort + index_add_", t, None, minimal_u, bw, op="moe_unpermute", **common)
        except Exception as e:  # pragma: no cover
            print(f"  torch peers unavailable: {e}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=name, copy_bandwidth=bw, rows=rows), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bench(a.shapes, a.dtype, a.json, a.repeat)


if __name__ == "__main__":
    main()
