"""GPU timing of hc_pre, hc_post and hc_post_pre (every CUDA variant and setting, and the rule's
choice) against a torch eager composite and torch.compile, with the copy bandwidth measured in
the same run.

    python bench/hyper_connections/hc_bench.py [--ops hc_pre hc_post hc_post_pre]
        [--tokens 1 8 64 1024 4096] [--dims 4096 7168] [--dtypes bfloat16 float32]
        [--variants naive split ...] [--json out.json]

Times are medians of CUDA-graph replays (``cuda_graph_time`` / ``torch_graph_time``: device time
without the host's launch cost).  Inputs (X, y, post, comb and hc_fn: every layer has its own
hc_fn) rotate among enough copies that the working set exceeds ROTATE_BYTES, more than an
H100's or H200's 50-60 MB L2, so no call finds its inputs in L2 as it would not in a model step.

Minimal bytes (each input read once, each output written once; y is bf16 throughout):
    hc_pre:       X (4 B D sx) + hc_fn (96 D) + x_in (2 B D) + post / comb (80 B)
    hc_post:      X (4 B D sx) + y (2 B D) + post / comb (80 B) + X_new (4 B D sx)
    hc_post_pre:  X + y + post / comb in + X_new + hc_fn + x_in + post / comb out
with sx = 4 (float32 streams) or 2 (bf16).  "% copy" = minimal bytes / time / copy bandwidth
(read + write bytes per second of a large device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

import ds4kern
import ds4kern.ops.hyper_connections  # noqa: F401  (registers the ops before ds4kern imports them)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name, torch_graph_time
from ds4kern.ops.hyper_connections import hc_post, hc_post_pre, hc_pre

OPS = {"hc_pre": hc_pre, "hc_post": hc_post, "hc_post_pre": hc_post_pre}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}
ROTATE_BYTES = 192 << 20
ITERS, EPS = 20, 1e-6


def minimal_bytes(op: str, B: int, D: int, sx: int) -> int:
    streams = 4 * B * D * sx
    fn, x_in, y, small = 96 * D, 2 * B * D, 2 * B * D, 80 * B
    if op == "hc_pre":
        return streams + fn + x_in + small
    if op == "hc_post":
        return 2 * streams + y + small
    return 2 * streams + y + fn + x_in + 2 * small


def make_set(cp, rng, B, D, dtype):
    X = cp.asarray((rng.standard_normal((B, 4, D), dtype=np.float32)).astype(DTYPES[dtype]))
    fn = cp.asarray((rng.standard_normal((24, 4 * D), dtype=np.float32) / math.sqrt(4 * D)).astype(np.float32))
    base = 0.5 * rng.standard_normal(24)
    base[8:] += 2 * np.eye(4).ravel()
    post = cp.asarray(rng.uniform(0.1, 1.9, (B, 4)).astype(np.float32))
    comb = rng.uniform(0.05, 1.0, (B, 4, 4))
    comb = cp.asarray((comb / comb.sum(axis=1, keepdims=True)).astype(np.float32))
    y = cp.asarray(rng.standard_normal((B, D), dtype=np.float32).astype(BFLOAT16))
    return dict(X=X, hc_fn=fn, hc_base=cp.asarray(base.astype(np.float32)), post=post, comb=comb, y=y,
                hc_scale_dev=cp.asarray(np.array([0.8, 1.0, 1.2], np.float32)))


SCALE = (0.8, 1.0, 1.2)


def op_args(op, s):
    mix = (s["hc_fn"], SCALE, s["hc_base"])
    if op == "hc_pre":
        return (s["X"],) + mix
    if op == "hc_post":
        return (s["y"], s["X"], s["post"], s["comb"])
    return (s["y"], s["X"], s["post"], s["comb"]) + mix


def outputs(cp, op, B, D, dtype):
    pre = (cp.empty((B, D), BFLOAT16), cp.empty((B, 4), np.float32), cp.empty((B, 4, 4), np.float32))
    new = cp.empty((B, 4, D), DTYPES[dtype])
    return {"hc_pre": pre, "hc_post": new, "hc_post_pre": (new,) + pre}[op]


def candidates(op, args):
    """("auto", None) for the rule's choice, then (variant, setting) for every supported
    variant and setting."""
    d = ds4kern.explain(op, *args)
    out = [("auto", None)]
    for c in d.candidates:
        if c.rejected is None and c.variant.backend == "cuda":
            cfgs = c.variant.configs_for(d.problem)
            out += [(c.variant.name, cf) for cf in cfgs] if cfgs else [(c.variant.name, None)]
    return out, d.chosen.label


def runner(op, name, config, out):
    """``call(args)`` running one variant with one setting (validation on the host each call:
    inside a captured graph only the kernels remain)."""
    if name == "auto":
        return lambda args: OPS[op](*args, out=out)
    fn = registry.get(op, name).fn

    def call(args):
        c = OPS[op].op.prepare(*args, out=out)
        with c.frame.running():
            fn(c.args, **(config or {}))

    return call


def torch_peers():
    try:
        import torch
    except Exception:
        return {}

    def mix(X, fn, scale, base):
        B = X.shape[0]
        xf = X.reshape(B, -1).float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)
        m = (xf @ fn.T) * r
        pre = torch.sigmoid(m[:, :4] * scale[0] + base[:4]) + EPS
        post = 2 * torch.sigmoid(m[:, 4:8] * scale[1] + base[4:8])
        c = (m[:, 8:] * scale[2] + base[8:]).view(B, 4, 4).softmax(-1) + EPS
        c = c / (c.sum(-2, keepdim=True) + EPS)
        for _ in range(ITERS - 1):
            c = c / (c.sum(-1, keepdim=True) + EPS)
            c = c / (c.sum(-2, keepdim=True) + EPS)
        return pre, post, c

    def pre(X, fn, scale, base):
        p, post, c = mix(X, fn, scale, base)
        return (p.unsqueeze(-1) * X.float()).sum(1).bfloat16(), post, c

    def post_(y, X, post, comb):
        new = post.unsqueeze(-1) * y.float().unsqueeze(1) + (comb.unsqueeze(-1) * X.float().unsqueeze(2)).sum(1)
        return new.to(X.dtype)

    def post_pre(y, X, post, comb, fn, scale, base):
        new = post_(y, X, post, comb)
        return (new,) + pre(new, fn, scale, base)

    eager = {"hc_pre": pre, "hc_post": post_, "hc_post_pre": post_pre}
    peers = {"torch_eager": eager}
    if NO_COMPILE:
        return peers
    try:
        torch._dynamo.reset()
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        peers["torch_compile"] = {k: torch.compile(v, dynamic=False) for k, v in eager.items()}
    except Exception as e:  # pragma: no cover
        print(f"torch.compile unavailable: {e}", file=sys.stderr)
    return peers


def torch_args(op, s):
    import torch

    t = {k: torch.from_dlpack(v) for k, v in s.items()}
    mix = (t["hc_fn"], t["hc_scale_dev"], t["hc_base"])
    if op == "hc_pre":
        return (t["X"],) + mix
    if op == "hc_post":
        return (t["y"], t["X"], t["post"], t["comb"])
    return (t["y"], t["X"], t["post"], t["comb"]) + mix


def bench(ops, tokens, dims, dtypes, repeat=50, only=None):
    import cupy as cp

    name = device_name()
    bw = copy_bandwidth()
    rng = np.random.default_rng()
    peers = torch_peers() if not only or "torch" in only else {}
    rows = []
    for dtype in dtypes:
        sx = DTYPES[dtype].itemsize
        for D in dims:
            for B in tokens:
                per_set = 4 * B * D * sx + 2 * B * D + 96 * D + 160 * B
                nsets = int(min(64, max(1, -(-ROTATE_BYTES // per_set))))
                sets = [make_set(cp, rng, B, D, dtype) for _ in range(nsets)]
                inner = min(20, max(2, nsets))
                for op in ops:
                    nbytes = minimal_bytes(op, B, D, sx)
                    out = outputs(cp, op, B, D, dtype)
                    cands, auto = candidates(op, op_args(op, sets[0]))
                    for vname, config in cands:
                        if only and vname not in only and not (vname == "auto" and "auto" in only):
                            continue
                        call = runner(op, vname, config, out)
                        label = auto if vname == "auto" else vname + (
                            "[" + ",".join(f"{k}={v}" for k, v in config.items()) + "]" if config else "")
                        try:
                            t = cuda_graph_time(lambda j, call=call: call(op_args(op, sets[j % nsets])), inner=inner,
                                                repeat=repeat)
                        except Exception as e:
                            print(f"{op} {label} failed at B={B} D={D} {dtype}: {e}", file=sys.stderr)
                            continue
                        rows.append(dict(device=name, op=op, dtype=dtype, D=D, B=B,
                                         impl=("auto: " if vname == "auto" else "") + label, us=t * 1e6,
                                         bytes=nbytes, gbs=nbytes / t / 1e9, pct_copy=100 * nbytes / t / bw))
                    for pname, fns in peers.items():
                        targs = [torch_args(op, s) for s in sets]
                        try:
                            t = torch_graph_time(lambda j, f=fns[op]: f(*targs[j % nsets]), inner=inner, repeat=repeat)
                        except Exception as e:
                            print(f"{pname} {op} failed at B={B} D={D} {dtype}: {e}", file=sys.stderr)
                            continue
                        rows.append(dict(device=name, op=op, dtype=dtype, D=D, B=B, impl=pname, us=t * 1e6,
                                         bytes=nbytes, gbs=nbytes / t / 1e9, pct_copy=100 * nbytes / t / bw))
                del sets
    return dict(device=name, copy_gbs=bw / 1e9, date=time.strftime("%Y-%m-%d"), rows=rows)


def table(res) -> str:
    out = [f"device: {res['device']}, copy bandwidth {res['copy_gbs']:.0f} GB/s (read+write), {res['date']}",
           "times: median of CUDA-graph replays, inputs rotated beyond L2; bytes: the minimal bytes above", "",
           "| op | X | D | B | impl | µs | MB | GB/s | % copy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['op']} | {r['dtype']} | {r['D']} | {r['B']} | {r['impl']} | {r['us']:.2f} | "
                   f"{r['bytes'] / 1e6:.2f} | {r['gbs']:.0f} | {r['pct_copy']:.1f} |")
    return "\n".join(out)


NO_COMPILE = False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024, 4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 7168])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--variants", nargs="+", help="only these ('auto': the rule's choice, 'torch': the peers)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peers (slow to build)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.no_compile:
        global NO_COMPILE
        NO_COMPILE = True
    res = bench(args.ops, args.tokens, args.dims, args.dtypes, args.repeat, args.variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))


if __name__ == "__main__":
    main()
