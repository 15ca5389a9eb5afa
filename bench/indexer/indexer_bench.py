"""GPU timing of indexer_topk: every CUDA variant, topk_rows alone on the same logits, and torch
peers (eager composite, torch.compile of it), against the copy bandwidth measured in the same run.

    python bench/indexer/indexer_bench.py [--shapes decode8 decode1 decode64 prefill] [--formats bf16 fp8]
        [--k 1024] [--json out.json]

Shapes (H = 64 heads of D = 128, k = 1024 by default):
  decode8:  B = T = 8 sequences, C = 262144 keys each (a 1M-token context at ratio 4), fp8 and bf16;
  decode1 / decode64: B = T = 1 / 64, C = 65536;
  prefill:  T = 4096 tokens of one sequence (B = 1), C = 16384, bf16; lengths (pos + 1) // 4 of a
            chunk ending at the last column (15361 .. 16384), logits TFLOP/s reported.
Decode lengths are C (every key visible).  Inputs are fresh random data each run (bf16 normal q
and keys, e4m3 codes of normal keys with per-row scales); the keys of one call are rotated among
enough sets to exceed twice an H100's 50 MB L2, so decode keys come from HBM.

Device times come from CUDA-graph replays of the variants' launches (``cuda_graph_time``: no host
launch cost, median of many replays after warm-up); torch peers are timed with CUDA events per
call (median), launches included.  Minimal bytes = keys read once (256 B a row bf16, 128 + 4 B
fp8) + q + w + the indices; the two-kernel variants also write and read the float32 logits
(8 B a (token, column)), reported as "+logits".  "% copy" = minimal bytes / time / copy bandwidth
(1 GiB device-to-device copy, read + write).  TFLOP/s counts 2 * 64 * 128 FLOP per (token,
visible column).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import ds4kern
import ds4kern.ops.indexer  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name, torch_time
from ds4kern.ops.indexer import indexer_topk
from ds4kern.ops.topk import topk_rows

OP = "indexer_topk"
SHAPES = {  # name: (T, shared keys, C, formats)
    "decode8": (8, False, 262144, ("fp8", "bf16")),
    "decode1": (1, False, 65536, ("fp8", "bf16")),
    "decode64": (64, False, 65536, ("fp8", "bf16")),
    "prefill": (4096, True, 16384, ("bf16",)),
}
L2_BYTES = 50 * 2 ** 20
INNER_MIN = 4


def lengths_for(T, shared, C):
    if not shared:
        return np.full(T, C, np.int32)
    pos = 4 * C - T + np.arange(T)  # a chunk of T tokens whose last token sees all C columns
    return ((pos + 1) // 4).astype(np.int32)


def key_bytes(fmt):
    return 256 if fmt == "bf16" else 132


def make_keys(cp, rs, B, C, fmt):
    x = rs.standard_normal((B, C, 128), dtype=cp.float32)
    if fmt == "bf16":
        return x.astype(BFLOAT16), None
    import ml_dtypes

    # e4m3 codes: the host converts (CuPy has no e4m3 dtype), one sequence at a time
    codes = cp.empty((B, C, 128), cp.uint8)
    for b in range(B):
        h = np.clip(cp.asnumpy(x[b]) * 64.0, -440, 440).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        codes[b] = cp.asarray(h)
    scales = (rs.uniform(0.5, 2.0, (B, C), dtype=cp.float32) / 64.0).astype(cp.float32)
    return codes, scales


def torch_indexer(fmt, shared, chunk):
    """Eager torch: (fp8: e4m3 -> bf16) keys, bf16 q.K^T on tensor cores, float32 (times scale),
    relu, weighted head sum, -inf beyond lengths, torch.topk.  Tokens in chunks (memory)."""
    import torch

    def step(q, w, keys, scales, lengths, k):
        T = q.shape[0]
        kb = keys.view(torch.float8_e4m3fn).to(torch.bfloat16) if fmt == "fp8" else keys
        C = kb.shape[1]
        out = torch.empty((T, C), dtype=torch.float32, device=q.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            if shared:
                s = torch.matmul(q[t0:t1], kb[0].transpose(0, 1)).float()
                if scales is not None:
                    s = s * scales[0][None, None, :]
            else:
                s = torch.bmm(q[t0:t1], kb[t0:t1].transpose(1, 2)).float()
                if scales is not None:
                    s = s * scales[t0:t1, None, :]
            out[t0:t1] = torch.bmm(w[t0:t1, None, :], s.relu_())[:, 0]
        cols = torch.arange(C, device=q.device)
        out.masked_fill_(cols[None, :] >= lengths[:, None], float("-inf"))
        return torch.topk(out, k, dim=1).indices

    return step


def bench(shapes, formats, k, json_path):
    import cupy as cp

    bw = copy_bandwidth()
    dev = device_name()
    print(f"device: {dev}; copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB D2D, read + write); k = {k}")
    try:
        import torch
    except Exception:
        torch = None
    seed = int.from_bytes(os.urandom(4), "little")
    rs = cp.random.RandomState(seed)
    print(f"input seed {seed}")
    results = []
    for shape in shapes:
        T, shared, C, fmts = SHAPES[shape]
        for fmt in [f for f in fmts if f in formats]:
            B = 1 if shared else T
            lengths_h = lengths_for(T, shared, C)
            lengths = cp.asarray(lengths_h)
            kb = key_bytes(fmt)
            set_bytes = B * C * kb
            nsets = max(1, min(16, -(-2 * L2_BYTES // set_bytes))) if not shared else 1
            sets = [make_keys(cp, rs, B, C, fmt) for _ in range(nsets)]
            q = rs.standard_normal((T, 64, 128), dtype=cp.float32).astype(BFLOAT16)
            w = rs.standard_normal((T, 64), dtype=cp.float32)
            out = cp.empty((T, k), np.int32)
            visible = int(lengths_h.sum())
            flop = 2 * 64 * 128 * visible
            read_keys = (int(lengths_h.max()) if shared else visible) * kb
            minimal = read_keys + T * (64 * 128 * 2 + 64 * 4 + k * 4)
            extra = T * C * 8
            row = dict(device=dev, shape=shape, format=fmt, T=T, B=B, C=C, k=k, flop=flop, bytes=minimal,
                       logits_bytes=extra, copy_gbs=bw / 1e9, times_us={})
            kw = [dict(lengths=lengths, key_format=fmt, out=out,
                       **({"key_scales": sc} if sc is not None else {})) for _, sc in sets]
            calls = [indexer_topk.op.prepare(q, w, keys, k, **kwj) for (keys, _), kwj in zip(sets, kw)]
            d = ds4kern.explain(OP, q, w, sets[0][0], k, **kw[0])
            row["rule"] = d.chosen.label if d.chosen is not None else None
            inner = max(INNER_MIN, nsets)
            for c in d.candidates:
                if c.rejected is not None or c.variant.backend != "cuda":
                    continue
                v = registry.get(OP, c.variant.name)
                try:
                    t = cuda_graph_time(lambda j, v=v: v.fn(calls[j % nsets].args), inner=inner)
                    row["times_us"][v.name] = t * 1e6
                except Exception as e:  # e.g. a variant too slow for the largest shape's graph
                    row.setdefault("errors", {})[v.name] = f"{type(e).__name__}: {e}"[:200]
            logits = cp.random.standard_normal((T, C), dtype=cp.float32)
            t = cuda_graph_time(lambda j: topk_rows(logits, k, lengths=lengths, out=out), inner=inner)
            row["times_us"]["topk_rows alone"] = t * 1e6
            del logits
            if torch is not None:
                tq, tw, tl = torch.from_dlpack(q), torch.from_dlpack(w), torch.from_dlpack(lengths).long()
                tsets = [(torch.from_dlpack(keys), None if sc is None else torch.from_dlpack(sc)) for keys, sc in sets]
                chunk = max(1, min(T, (1 << 30) // (64 * C * 4)))
                step = torch_indexer(fmt, shared, chunk)
                for name, fn in (("torch eager", step), ("torch.compile", None)):
                    try:
                        if fn is None:
                            fn = torch.compile(step)
                        j = [0]

                        def call(fn=fn):
                            keys, sc = tsets[j[0] % nsets]
                            j[0] += 1
                            return fn(tq, tw, keys, sc, tl, k)

                        row["times_us"][name] = torch_time(call, repeat=20) * 1e6
                    except Exception as e:
                        row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.empty_cache()
            results.append(row)
            print(f"\n{shape} {fmt} T={T} B={B} C={C}: minimal {minimal / 1e6:.1f} MB (+logits {extra / 1e6:.1f} MB), "
                  f"{flop / 1e12:.3f} TFLOP; rule picks {row['rule']}")
            for label, us in sorted(row["times_us"].items(), key=lambda kv: kv[1]):
                print(f"  {label:20s} {us:10.1f} us  {100 * minimal / (us * 1e-6) / bw:6.1f}% copy  "
                      f"{flop / (us * 1e-6) / 1e12:7.1f} TFLOP/s")
            for label, err in row.get("errors", {}).items():
                print(f"  {label}: {err}")
            del sets, calls
            cp.get_default_memory_pool().free_all_blocks()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["fp8", "bf16"], choices=["bf16", "fp8"])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bench(a.shapes, a.formats, a.k, a.json)


if __name__ == "__main__":
    main()
