"""GPU timing of the TE dense form and its backward (CUDA naive) against torch, with the copy
bandwidth measured in the same run.

    python bench/router_te/te_bench.py [--tokens 4096 65536] [--json out.json]

DeepSeek-V4-Flash routing (E=256, k=6, sqrtsoftplus + bias, scaling 1.5), float32 and bfloat16.
Minimal bytes: forward T*E*(sizeof(logits) [read] + sizeof(probs) + 4 [intermediate] + 1 [bytemap]);
backward from the bytemap T*E*(2*sizeof + 4 + 1), from the bitmap T*E*(2*sizeof + 4) + T*ceil(E/8);
from int32 dense indices T*k*(sizeof + 4 + 4) +
T*E*sizeof (the zero-filled gradient).  Device time from CUDA-graph replays, inputs rotating
beyond L2.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name, torch_graph_time

E, K, SCALE = 256, 6, 1.5
ROTATE = 256 << 20


def main(argv=None):
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    name = device_name()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s")
    try:
        import torch
    except Exception:
        torch = None
    rows = []
    bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
    kw = dict(score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=SCALE)
    for dt_name, dt in (("float32", np.float32), ("bfloat16", BFLOAT16)):
        size = np.dtype(dt).itemsize
        for T in a.tokens:
            n = max(2, min(16, ROTATE // (T * E * (2 * size + 5))))
            xs = [cp.asarray(rng.standard_normal((T, E)).astype(dt)) for _ in range(n)]
            gs = [cp.asarray(rng.standard_normal((T, E)).astype(dt)) for _ in range(n)]
            outs = [ds4kern.router_topk_dense(x, K, variant="naive", **kw) for x in xs]
            idx = [cp.asarray(np.argsort(~cp.asnumpy(o[1]), axis=-1, kind="stable")[:, :K].astype(np.int32))
                   for o in outs]
            inner = max(10, n)
            t_f = cuda_graph_time(lambda j: ds4kern.router_topk_dense(xs[j % n], K, variant="naive", **kw),
                                  inner=inner)
            bkw = dict(topk=K, score_function="sqrtsoftplus", scaling_factor=SCALE, variant="naive")
            t_bm = cuda_graph_time(lambda j: ds4kern.router_topk_backward(gs[j % n], outs[j % n][2],
                                                                          routing_map=outs[j % n][1], **bkw), inner=inner)
            bits = [ds4kern.router_topk_dense(x, K, variant="naive", routing_map="bitmap", **kw)[1] for x in xs]
            t_bb = cuda_graph_time(lambda j: ds4kern.router_topk_backward(gs[j % n], outs[j % n][2],
                                                                          routing_map=bits[j % n], **bkw), inner=inner)
            t_bi = cuda_graph_time(lambda j: ds4kern.router_topk_backward(gs[j % n], outs[j % n][2],
                                                                          topk_indices=idx[j % n], **bkw), inner=inner)
            b_f = T * E * (size + size + 4 + 1)
            b_bm = T * E * (2 * size + 4 + 1)
            b_bb = T * E * (2 * size + 4) + T * ((E + 7) // 8)
            b_bi = T * K * (size + 4 + 4) + T * E * size
            row = dict(device=name, dtype=dt_name, T=T, copy_gbs=bw / 1e9,
                       fwd_us=t_f * 1e6, fwd_pct=100 * b_f / t_f / bw,
                       bwd_map_us=t_bm * 1e6, bwd_map_pct=100 * b_bm / t_bm / bw,
                       bwd_bits_us=t_bb * 1e6, bwd_bits_pct=100 * b_bb / t_bb / bw,
                       bwd_idx_us=t_bi * 1e6, bwd_idx_pct=100 * b_bi / t_bi / bw)
            if torch is not None:
                tb = torch.from_dlpack(bias)
                tx = [torch.from_dlpack(x) for x in xs]
                tg = [torch.from_dlpack(g) for g in gs]

                def fwd(x):
                    s = torch.sqrt(torch.nn.functional.softplus(x.float()))
                    idx_ = torch.topk(s + tb, K, dim=-1).indices
                    w = s.gather(-1, idx_)
                    w = w / (w.sum(-1, keepdim=True) + 1e-20) * SCALE
                    return torch.zeros_like(s).scatter(-1, idx_, w).to(x.dtype)

                row["torch_fwd_us"] = torch_graph_time(lambda j: fwd(tx[j % n]), inner=inner) * 1e6
                xr = [t.detach().clone().requires_grad_(True) for t in tx[:2]]

                def fb(j):
                    x = xr[j % 2]
                    x.grad = None
                    fwd(x).backward(tg[j % n])

                try:
                    row["torch_fwd_bwd_us"] = torch_graph_time(fb, inner=10) * 1e6
                except Exception as e:  # pragma: no cover
                    print(f"torch backward graph failed: {type(e).__name__}: {e}")
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if k not in ("device",)), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
