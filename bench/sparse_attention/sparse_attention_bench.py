"""GPU timing of sparse_attention: every CUDA variant (each of its settings) and a torch eager
composite, side by side, against the copy bandwidth measured in the same run.

    python bench/sparse_attention/sparse_attention_bench.py [--shapes flash pro] [--rows 1 8 64 256]
        [--formats bf16 fp8] [--pool-rows 524288] [--json out.json]

Shapes: Flash CSA (H=64, K=640 = window 128 + top-k 512) and Pro CSA (H=128, K=1152 = 128 + 1024).
Slots are drawn at random from a pool of --pool-rows rows (default 512 Ki rows: 512 MiB bf16,
292 MiB fp8, about 10x / 6x an H100's 50 MB L2); each call of a timed graph uses its own index set,
so gathered rows come from HBM, while q and o (small) may stay in L2.  Device times come from
CUDA-graph replays (``cuda_graph_time`` / ``torch_graph_time``: no host launch cost), median of
many replays after warm-up; torch eager is also timed per call with events, launches included.

Minimal bytes = gathered rows once (N * K * 1024 B bf16, N * K * 584 B fp8) + q + o (N * H * 1 KB
each); indices (N * K * 4 B) are not counted.  "% copy" = minimal bytes / time / copy bandwidth
(1 GiB device-to-device copy, bytes read + written).  TFLOP/s counts q.K and p.V:
4 * N * H * K * 512 FLOP.  The split_k variant's scratch comes from CuPy's memory pool; the
warm-up fills the pool, so the graph replays reuse the same blocks.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
import ds4kern.ops.sparse_attention  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name, torch_graph_time
from ds4kern.ops.sparse_attention import pack_kv_fp8, sparse_attention

OP = "sparse_attention"
SHAPES = {"flash": (64, 640), "pro": (128, 1152)}
INNER = 20  # calls per graph, each with its own index set
SCALE = 512 ** -0.5


def minimal_bytes(N, H, K, fmt):
    row = 1024 if fmt == "bf16" else 584
    return N * K * row + 2 * N * H * 1024


def flops(N, H, K):
    return 4 * N * H * K * 512


def make_pool(cp, P, fmt, seed=0):
    rs = cp.random.RandomState(seed)
    kv = rs.standard_normal((P, 512), dtype=cp.float32).astype(BFLOAT16)
    return pack_kv_fp8(kv) if fmt == "fp8" else kv


def torch_composite(fmt):
    """Eager torch: gather the rows, (fp8: dequantise), q.K, softmax with the sink as an extra
    logit, p.V; invalid slots masked."""
    import torch

    def dequant(rows):  # [N, K, 584] uint8 -> [N, K, 512] bf16
        nope = rows[..., :448].contiguous().view(torch.float8_e4m3fn).float()
        scale = torch.exp2(rows[..., 576:583].float() - 127.0)
        nope = (nope.unflatten(-1, (7, 64)) * scale.unsqueeze(-1)).flatten(-2)
        rope = rows[..., 448:576].contiguous().view(torch.bfloat16).float()
        return torch.cat([nope, rope], -1).to(torch.bfloat16)

    def step(q, pool, idx, sink, out):
        valid = idx >= 0
        rows = pool[idx.clamp_min(0).long()]
        if fmt == "fp8":
            rows = dequant(rows)
        s = torch.einsum("nhd,nkd->nhk", q.float(), rows.float()) * SCALE
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        s = torch.cat([s, sink[None, :, None].expand(s.shape[0], -1, 1)], -1)
        p = torch.softmax(s, -1)[..., :-1]
        out.copy_(torch.einsum("nhk,nkd->nhd", p, rows.float()))

    return step


def torch_sdpa(fmt):
    """torch's scaled_dot_product_attention on the gathered rows (one KV head shared by the H
    query heads, enable_gqa); the sink as one extra all-zero key and value whose additive mask
    entry is sink[h] (its logit is exactly the sink, its value adds nothing); invalid slots
    masked with -inf in the same float mask."""
    import torch
    import torch.nn.functional as F

    def step(q, pool, idx, sink, out):
        N, H, D = q.shape
        rows = pool[idx.clamp_min(0).long()]
        if fmt == "fp8":
            nope = rows[..., :448].contiguous().view(torch.float8_e4m3fn).float()
            scale = torch.exp2(rows[..., 576:583].float() - 127.0)
            nope = (nope.unflatten(-1, (7, 64)) * scale.unsqueeze(-1)).flatten(-2)
            rope = rows[..., 448:576].contiguous().view(torch.bfloat16).float()
            rows = torch.cat([nope, rope], -1).to(torch.bfloat16)
        kv = torch.cat([rows, rows.new_zeros((N, 1, D))], 1).unsqueeze(1)        # [N, 1, K + 1, D]
        bias = torch.zeros((N, H, 1, idx.shape[1] + 1), dtype=q.dtype, device=q.device)
        bias[..., :-1].masked_fill_(~(idx >= 0)[:, None, None, :], float("-inf"))
        bias[..., -1] = sink.to(q.dtype)[None, :, None]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kv, kv, attn_mask=bias, scale=SCALE, enable_gqa=True)
        out.copy_(o.squeeze(2))

    return step


def bench(shapes, rows_list, formats, pool_rows, json_path):
    import cupy as cp

    bw = copy_bandwidth()
    dev = device_name()
    print(f"device: {dev}; copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB D2D, read + write); pool {pool_rows} rows")
    try:
        import torch
    except Exception:
        torch = None
    results = []
    for fmt in formats:
        pool = make_pool(cp, pool_rows, fmt)
        for shape in shapes:
            H, K = SHAPES[shape]
            for N in rows_list:
                rs = np.random.default_rng(N * 1000 + H)
                q = cp.asarray(rs.standard_normal((N, H, 512)).astype(BFLOAT16))
                sink = cp.asarray(rs.standard_normal(H).astype(np.float32))
                idx_sets = [cp.asarray(rs.integers(0, pool_rows, (N, K)).astype(np.int32)) for _ in range(INNER)]
                out = cp.empty((N, H, 512), BFLOAT16)
                lse = cp.empty((N, H), np.float32)
                nbytes, nflop = minimal_bytes(N, H, K, fmt), flops(N, H, K)
                row = dict(device=dev, format=fmt, shape=shape, N=N, H=H, K=K, bytes=nbytes, flop=nflop,
                           copy_gbs=bw / 1e9, times_us={})
                calls = [sparse_attention.op.prepare(q, pool, ix, sink, kv_format=fmt, out=out, lse=lse)
                         for ix in idx_sets]
                d = ds4kern.explain(OP, q, pool, idx_sets[0], sink, kv_format=fmt, out=out, lse=lse)
                row["rule"] = d.chosen.label if d.chosen is not None else None
                for c in d.candidates:
                    if c.rejected is not None or c.variant.backend != "cuda":
                        continue
                    v = registry.get(OP, c.variant.name)
                    for cfg in (v.configs_for(d.problem) or [{}]):
                        label = v.name + "".join(f"[{k}={x}]" for k, x in cfg.items())
                        t = cuda_graph_time(lambda j, v=v, cfg=cfg: v.fn(calls[j % INNER].args, **cfg), inner=INNER)
                        row["times_us"][label] = t * 1e6
                if torch is not None:
                    step = torch_composite(fmt)
                    tq, tp, ts = torch.from_dlpack(q), torch.from_dlpack(pool), torch.from_dlpack(sink)
                    tix = [torch.from_dlpack(ix) for ix in idx_sets]
                    tout = torch.empty((N, H, 512), dtype=torch.float32, device=tq.device)
                    try:
                        t = torch_graph_time(lambda j: step(tq, tp, tix[j % INNER], ts, tout), inner=INNER)
                        row["times_us"]["torch_eager_graph"] = t * 1e6
                        k = [0]

                        def eager():
                            step(tq, tp, tix[k[0] % INNER], ts, tout)
                            k[0] += 1

                        row["times_us"]["torch_eager_per_call"] = cuda_time(eager, warmup=3, repeat=20) * 1e6
                    except Exception as e:  # e.g. out of memory for the [N, K, 512] float gather
                        row["torch_error"] = f"{type(e).__name__}: {e}"[:200]
                    sdpa = torch_sdpa(fmt)
                    try:
                        t = torch_graph_time(lambda j: sdpa(tq, tp, tix[j % INNER], ts, tout), inner=INNER)
                        row["times_us"]["torch_sdpa_graph"] = t * 1e6
                        ds4kern.sparse_attention(q, pool, idx_sets[0], sink, kv_format=fmt, out=out)
                        sdpa(tq, tp, tix[0], ts, tout)
                        want = torch.from_dlpack(out).float()
                        row["sdpa_max_rel_diff"] = float((tout - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    except Exception as e:  # reported, not fatal
                        row["sdpa_error"] = f"{type(e).__name__}: {e}"[:200]
                results.append(row)
                print(f"\n{fmt} {shape} (H={H}, K={K}) N={N}: minimal {nbytes / 1e6:.2f} MB, "
                      f"{nflop / 1e9:.2f} GFLOP; rule picks {row['rule']}")
                for label, us in sorted(row["times_us"].items(), key=lambda kv: kv[1]):
                    gbs = nbytes / (us * 1e-6) / 1e9
                    print(f"  {label:32s} {us:9.2f} us  {100 * gbs * 1e9 / bw:5.1f}% copy  "
                          f"{nflop / (us * 1e-6) / 1e12:6.1f} TFLOP/s")
                if "sdpa_max_rel_diff" in row:
                    print(f"  (torch_sdpa against ours: max |diff| / max |out| = {row['sdpa_max_rel_diff']:.1e})")
                for key in ("torch_error", "sdpa_error"):
                    if key in row:
                        print(f"  {key}: {row[key]}")
        del pool
        cp.get_default_memory_pool().free_all_blocks()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--pool-rows", type=int, default=1 << 19)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bench(a.shapes, a.rows, a.formats, a.pool_rows, a.json)


if __name__ == "__main__":
    main()
