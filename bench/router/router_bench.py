"""GPU timing of router_topk variants and peers, with the copy bandwidth measured in the same run.

Configurations: ``flash`` (DeepSeek-V4-Flash: E=256, k=6, sqrtsoftplus + bias, scaling 1.5) and
``v3`` (DeepSeek-V3 style: E=256, k=8, sigmoid + bias, 8 groups, top 4 groups, scaling 2.5).

    python bench/router/router_bench.py [--configs flash v3] [--tokens 1 128 4096 65536]
                                 [--dtypes float32 bfloat16] [--json out.json]

Times are CUDA-event medians after warm-up; inputs rotate among enough copies to exceed the L2
cache, so no run reads its logits from cache.  "py_us" is the host-side cost of one call
(validation, dispatch, launch; no synchronisation), measured separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name, host_time, torch_graph_time

CONFIGS = {
    "flash": dict(E=256, k=6, score_function="sqrtsoftplus", scaling_factor=1.5, groups=None),
    "v3": dict(E=256, k=8, score_function="sigmoid", scaling_factor=2.5, groups=(8, 4)),
}
E, K, SCALING = 256, 6, 1.5  # the flash configuration (also used by test_bench_router.py)
ROTATE_BYTES = 256 << 20  # more than the 50-60 MB L2 of an H100/H200


def minimal_bytes(T, itemsize, index_itemsize=4, E=E, k=K):
    return T * E * itemsize + T * k * (4 + index_itemsize)


def torch_peers(cfg=None):
    cfg = cfg or CONFIGS["flash"]
    try:
        import torch
        import torch.nn.functional as F
    except Exception:
        return {}
    k, scaling, groups = cfg["k"], cfg["scaling_factor"], cfg["groups"]

    def eager(x, bias):
        x = x.float()
        if cfg["score_function"] == "sqrtsoftplus":
            s = torch.sqrt(F.softplus(x))  # softplus(x) = x for x > 20, as in the spec
        else:
            s = torch.sigmoid(x)
        sel = s + bias
        if groups:
            G, gt = groups
            T = sel.shape[0]
            gscore = sel.view(T, G, -1).topk(k // gt, dim=-1).values.sum(-1)
            keep = gscore.topk(gt, dim=-1).indices
            mask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
            sel = sel.masked_fill(~mask.repeat_interleave(sel.shape[1] // G, dim=1), float("-inf"))
        idx = torch.topk(sel, k, dim=-1).indices
        w = s.gather(-1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * scaling
        return w, idx.int()

    peers = {"torch_eager": eager}
    try:
        torch._dynamo.reset()  # a fresh compile cache per configuration (else the recompile limit hits)
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape and dtype
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        peers["torch_compile"] = torch.compile(eager, dynamic=False)
    except Exception as e:  # pragma: no cover
        print(f"torch.compile unavailable: {e}", file=sys.stderr)
    return peers


def bench(tokens, dtypes, repeat=200, config="flash", only=None):
    import cupy as cp

    name = device_name()
    bw = copy_bandwidth()
    rows = []
    rng = np.random.default_rng()
    cfg = CONFIGS[config]
    E, K = cfg["E"], cfg["k"]
    kw = dict(score_function=cfg["score_function"], scaling_factor=cfg["scaling_factor"])
    if cfg["groups"]:
        kw.update(num_groups=cfg["groups"][0], group_topk=cfg["groups"][1])
    peers = torch_peers(cfg) if not only or "torch" in only else {}
    variants = [v.name for v in ds4kern.variants("router_topk") if v.backend == "cuda" and (not only or v.name in only)]
    for dtype in dtypes:
        dt = {"float32": np.float32, "bfloat16": BFLOAT16}[dtype]
        for T in tokens:
            nbytes = minimal_bytes(T, np.dtype(dt).itemsize, E=E, k=K)
            nsets = int(min(64, max(1, -(-ROTATE_BYTES // max(1, T * E * np.dtype(dt).itemsize)))))
            xs = [cp.asarray(rng.standard_normal((T, E), dtype=np.float32).astype(dt)) for _ in range(nsets)]
            bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
            w_o, i_o = cp.empty((T, K), cp.float32), cp.empty((T, K), cp.int32)
            cur = [0]

            def rotate(i):
                cur[0] = i % nsets

            rejected = {c.variant.name for c in
                        ds4kern.explain("router_topk", xs[0], K, expert_bias=bias, **kw).candidates if c.rejected}
            for v in variants:
                if v in rejected:
                    continue  # this variant cannot run the configuration

                def call(v=v, xs=xs):  # (bound now: xs is deleted after each T)
                    ds4kern.router_topk(xs[cur[0]], K, expert_bias=bias, out=(w_o, i_o), variant=v, **kw)

                def call_j(j, v=v, xs=xs):
                    ds4kern.router_topk(xs[j % nsets], K, expert_bias=bias, out=(w_o, i_o), variant=v, **kw)
                try:
                    t = cuda_time(call, warmup=10, repeat=repeat, setup=rotate)
                except Exception as e:
                    print(f"{v} failed at T={T} {dtype}: {e}", file=sys.stderr)
                    continue
                try:
                    tg = cuda_graph_time(call_j, inner=min(20, max(2, nsets)), repeat=max(10, repeat // 4))
                except Exception as e:
                    print(f"{v} graph capture failed at T={T} {dtype}: {e}", file=sys.stderr)
                    tg = float("nan")
                # host cost of one call: many back-to-back launches, no sync inside
                host = host_time(call, 2000 if T <= 4096 else 200)
                best = tg if tg == tg else t
                rows.append(dict(device=name, config=config, dtype=dtype, T=T, impl=v, us=t * 1e6, graph_us=tg * 1e6,
                                 py_us=host * 1e6, gbs=nbytes / best / 1e9, pct_copy=100 * nbytes / best / bw))
            if peers:
                import torch

                xt = [torch.from_dlpack(x) for x in xs]
                bt = torch.from_dlpack(bias)
                for pname, fn in peers.items():
                    try:
                        t = cuda_time(lambda: fn(xt[cur[0]], bt), warmup=10, repeat=repeat, setup=rotate)
                    except Exception as e:
                        print(f"{pname} failed at T={T} {dtype}: {e}", file=sys.stderr)
                        continue
                    try:
                        tg = torch_graph_time(lambda j: fn(xt[j % nsets], bt), inner=min(20, max(2, nsets)),
                                              repeat=max(10, repeat // 4))
                    except Exception as e:
                        print(f"{pname} graph capture failed at T={T} {dtype}: {e}", file=sys.stderr)
                        tg = float("nan")
                    best = tg if tg == tg else t
                    rows.append(dict(device=name, config=config, dtype=dtype, T=T, impl=pname, us=t * 1e6,
                                     graph_us=tg * 1e6,
                                     py_us=float("nan"), gbs=nbytes / best / 1e9, pct_copy=100 * nbytes / best / bw))
            del xs
    return dict(device=name, copy_gbs=bw / 1e9, date=time.strftime("%Y-%m-%d"), rows=rows)


def table(res) -> str:
    out = [f"device: {res['device']}, copy bandwidth {res['copy_gbs']:.0f} GB/s (read+write), {res['date']}",
           "", "GB/s and % copy from the graph-replay time (device time without host launch gaps; per-call time where capture failed);",
           "'per call' is CUDA events around back-to-back Python calls (host-bound at small T).", "",
           "| config | dtype | T | impl | graph µs | per call µs | GB/s | % copy | host µs/call |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        py = "" if r["py_us"] != r["py_us"] else f"{r['py_us']:.1f}"
        out.append(f"| {r['config']} | {r['dtype']} | {r['T']} | {r['impl']} | {r['graph_us']:.2f} | {r['us']:.2f} | "
                   f"{r['gbs']:.0f} | "
                   f"{r['pct_copy']:.1f} | {py} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096, 65536])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", help="only these variants ('torch' keeps the torch peers)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = None
    for c in args.configs:
        r = bench(args.tokens, args.dtypes, args.repeat, config=c, only=args.variants)
        if res is None:
            res = r
        else:
            res["rows"] += r["rows"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))


if __name__ == "__main__":
    main()
