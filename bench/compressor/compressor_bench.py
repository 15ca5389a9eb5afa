"""GPU timing of compress_decode: the U-curve over pool_group, torch peers, copy bandwidth.

Every batch row emits (positions p with (p + 1) % ratio == 0), as in the spec's targets.

    python bench/compressor/compressor_bench.py [--ratios 4 128] [--dims 512] [--batches 1 3 8 64 256]
                                     [--dtype float32] [--compile] [--json out.json]

Device times come from CUDA-graph replays (no host launch cost), median of many replays after
warm-up.  The calls of a graph rotate among enough copies of the state to exceed the L2 cache
(unless the whole rotation fits in it: B = 1..8), so the state is read from HBM as in a real
decode step where other layers ran in between.  Torch peers: the same step (state write, pool,
RMSNorm, RoPE, cache write) in eager torch, timed per call with events ("eager", what a user
sees, launches included) and from a torch CUDA graph ("eager_graph"); torch.compile with --compile.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.compressor import coff_of, init_state, pool_groups
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name, host_time, torch_graph_time

ROTATE_BYTES = 200 << 20  # a few times the 50 MB L2 of an H100
EPS = 1e-6


def minimal_bytes(B, R, d, in_size=4, out_size=4):
    """Bytes a decode step must move when every row emits (float32 state)."""
    if R == 4:  # rows 0-3 front + rows 4-6 both halves read, rows 0-3 + 7 written, kv and score
        state = 2 * (10 + 10) * d * 4
        tokens = 2 * 2 * d * in_size
    else:  # the 127 older rows read, the token's row written, kv and score
        state = 2 * (127 + 1) * d * 4
        tokens = 2 * d * in_size
    return B * (state + tokens + d * out_size + 8) + R * coff_of(R) * d * 4 + d * 4


def make(cp, rng, B, R, d, dtype, nsets):
    c = coff_of(R)
    rows = 4
    ks, ss = init_state(B, R, d)
    sets = []
    for _ in range(nsets):
        k = rng.standard_normal(ks.shape).astype(np.float32)
        s = (2 * rng.standard_normal(ss.shape)).astype(np.float32)
        sets.append((cp.asarray(k), cp.asarray(s)))
    cos, sin = ds4kern.rope_table(rows * R, theta=160000.0, device=True)
    inp = dict(kv=cp.asarray(rng.standard_normal((B, c * d)).astype(dtype)),
               score=cp.asarray(rng.standard_normal((B, c * d)).astype(dtype)),
               ape=cp.asarray((0.5 * rng.standard_normal((R, c * d))).astype(np.float32)),
               norm_w=cp.asarray((1 + 0.1 * rng.standard_normal(d)).astype(np.float32)),
               positions=cp.asarray((rng.integers(0, rows, B) * R + R - 1).astype(np.int32)),
               rope_cos=cos, rope_sin=sin,
               cache=cp.asarray(rng.standard_normal((B, rows, d)).astype(np.float32)))
    return inp, sets


def torch_step_fn(R, d):
    import torch

    def step(kv, score, ape, w, pos, cos, sin, ks, ss, cache):
        B = kv.shape[0]
        ar = torch.arange(B, device=kv.device)
        r = pos % R
        rows = R + r if R == 4 else r
        ks[ar, rows] = kv.float()
        ss[ar, rows] = score.float() + ape[r]
        if R == 4:
            K = torch.cat([ks[:, :4, :d], ks[:, 4:, d:]], dim=1)
            S = torch.cat([ss[:, :4, :d], ss[:, 4:, d:]], dim=1)
            ks[:, :4] = ks[:, 4:].clone()
            ss[:, :4] = ss[:, 4:].clone()
        else:
            K, S = ks, ss
        c = (K * torch.softmax(S, dim=1)).sum(1)
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + EPS) * w
        q = pos + 1 - R
        cs, sn = cos[q], sin[q]
        x0, x1 = c[:, d - 64::2], c[:, d - 63::2]
        c = torch.cat([c[:, :d - 64], torch.stack([x0 * cs - x1 * sn, x0 * sn + x1 * cs], -1).flatten(1)], 1)
        cache[ar, pos // R] = c
    return step


def bench(ratios, dims, batches, dtype_name, use_compile, repeat):
    import cupy as cp

    rng = np.random.default_rng(0)
    dtype = {"float32": np.float32, "bfloat16": BFLOAT16}[dtype_name]
    in_size = np.dtype(dtype).itemsize
    bw = copy_bandwidth()
    dev = device_name()
    print(f"device: {dev}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write, 1 GiB D2D)")
    try:
        import torch
    except Exception:
        torch = None
    results = []
    for R in ratios:
        for d in dims:
            for B in batches:
                c = coff_of(R)
                set_bytes = 2 * B * c * R * c * d * 4
                nsets = max(1, min(32, math.ceil(ROTATE_BYTES / set_bytes)))
                inp, sets = make(cp, rng, B, R, d, dtype, nsets)
                inner = max(20, nsets)
                nbytes = minimal_bytes(B, R, d, in_size, 4)
                row = dict(device=dev, ratio=R, d=d, B=B, dtype=dtype_name, bytes=nbytes, copy_gbs=bw / 1e9,
                           state_sets=nsets, times_us={})

                def call(j, variant, g):
                    ks, ss = sets[j % nsets]
                    ds4kern.compress_decode(inp["kv"], inp["score"], inp["ape"], inp["norm_w"], inp["positions"],
                                            inp["rope_cos"], inp["rope_sin"], ks, ss, inp["cache"], ratio=R,
                                            variant=variant, pool_group=g)

                for g in (1,) + pool_groups(R):
                    if g > 1 and B < 2:
                        continue
                    t = cuda_graph_time(lambda j, g=g: call(j, "naive" if g == 1 else "grouped", None if g == 1 else g),
                                        inner=inner, repeat=repeat)
                    row["times_us"][f"pool_group={g}"] = t * 1e6
                # the floor: a plain copy moving the same bytes (half read, half written), rotating
                # buffers like the state so it also comes from HBM
                row["times_us"]["copy_same_bytes"] = _copy_floor(cp, nbytes, inner, repeat) * 1e6
                # host cost of one call (validation + dispatch + launch), no sync
                row["py_us"] = host_time(lambda: call(0, None, None)) * 1e6
                if torch is not None:
                    _torch_peers(torch, cp, R, d, inp, sets, nsets, inner, repeat, row, use_compile)
                best = min((v, k) for k, v in row["times_us"].items() if k.startswith("pool_group"))
                row["best"] = best[1]
                row["best_pct_copy"] = 100 * nbytes / (best[0] * 1e-6) / bw
                # what the autotuner picks for this bucket (fresh cache per bucket)
                row["autotune"] = _autotune_pick(cp, call)
                results.append(row)
                ts = "  ".join(f"{k.split('=')[-1] if k.startswith('pool') else k}:{v:7.2f}" for k, v in row["times_us"].items())
                print(f"R={R:3d} d={d} B={B:3d} {nbytes / 1e6:8.2f} MB  {ts}  best {best[1]} "
                      f"{row['best_pct_copy']:.0f}% copy  autotune {row['autotune']}  host {row['py_us']:.0f} us",
                      flush=True)
                cp.get_default_memory_pool().free_all_blocks()
    return results


def _copy_floor(cp, nbytes, inner, repeat):
    n = max(1, nbytes // 8)  # float32 elements per buffer: nbytes / 2 read + nbytes / 2 written
    k = max(1, min(inner, math.ceil(ROTATE_BYTES / (8 * n))))
    bufs = [(cp.ones(n, cp.float32), cp.empty(n, cp.float32)) for _ in range(k)]
    t = cuda_graph_time(lambda j: cp.copyto(bufs[j % k][1], bufs[j % k][0]), inner=inner, repeat=repeat)
    return t


def _autotune_pick(cp, call):
    import tempfile

    from ds4kern.core import autotune

    with tempfile.TemporaryDirectory() as tmp:
        import os

        old = os.environ.get("DS4KERN_CACHE_DIR")
        os.environ["DS4KERN_CACHE_DIR"] = tmp
        autotune.clear()
        try:
            with autotune.autotuning():
                call(0, None, None)
                path = os.path.join(tmp, "autotune.json")
                if not os.path.exists(path):
                    return "naive (only candidate)"
                entry = next(iter(json.loads(open(path).read())["entries"].values()), None)
        finally:
            if old is None:
                os.environ.pop("DS4KERN_CACHE_DIR", None)
            else:
                os.environ["DS4KERN_CACHE_DIR"] = old
            autotune.clear()
    if entry is None:
        return "-"
    return autotune.entry_label(entry)


def _torch_peers(torch, cp, R, d, inp, sets, nsets, inner, repeat, row, use_compile):
    t = {k: torch.from_dlpack(v) for k, v in inp.items()}
    tsets = [(torch.from_dlpack(a), torch.from_dlpack(b)) for a, b in sets]
    pos = t["positions"].long()
    step = torch_step_fn(R, d)

    def run(fn, j):
        ks, ss = tsets[j % nsets]
        fn(t["kv"], t["score"], t["ape"], t["norm_w"], pos, t["rope_cos"], t["rope_sin"], ks, ss, t["cache"])

    torch.cuda.synchronize()
    s = torch.cuda.current_stream()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for j in range(5):
        run(step, j)
    for i in range(repeat):
        starts[i].record(s)
        run(step, i)
        stops[i].record(s)
    torch.cuda.synchronize()
    row["times_us"]["torch_eager"] = float(np.median([a.elapsed_time(b) for a, b in zip(starts, stops)])) * 1e3
    row["times_us"]["torch_eager_graph"] = torch_graph_time(lambda j: run(step, j), inner=inner, repeat=repeat) * 1e6
    if use_compile:
        try:
            torch._dynamo.reset()  # one compile per configuration (else the recompile limit hits)
            comp = torch.compile(step, dynamic=False)
            row["times_us"]["torch_compile_graph"] = torch_graph_time(lambda j: run(comp, j), inner=inner,
                                                                      repeat=repeat) * 1e6
        except Exception as e:  # pragma: no cover
            print(f"torch.compile failed: {type(e).__name__}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 128])
    ap.add_argument("--dims", type=int, nargs="+", default=[512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 3, 8, 64, 256])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = bench(a.ratios, a.dims, a.batches, a.dtype, a.compile, a.repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
