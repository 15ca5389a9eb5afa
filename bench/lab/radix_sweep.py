"""router_topk variants over (E, k): the measurements behind the radix dispatch rule.

    python bench/lab/radix_sweep.py [--tokens 16384] [--json out.json]

sigmoid + bias scores, float32 logits, device time from CUDA-graph replays (inputs rotating
beyond L2), median of 30 replays.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
from ds4kern.core.timing import cuda_graph_time

GRID = [(256, 6), (256, 16), (256, 32), (512, 8), (512, 32), (256, 128), (1024, 8), (1024, 64), (1024, 256), (3072, 16), (3072, 128),
        (3072, 512), (8192, 16), (8192, 256)]


def main(argv=None):
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--json")
    ap.add_argument("--max-e", type=int, default=1 << 30, help="skip E above this")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    T = a.tokens
    rows = []
    for E, k in GRID:
        if E > a.max_e:
            continue
        n = max(2, min(8, (256 << 20) // (T * E * 4)))
        xs = [cp.asarray(rng.standard_normal((T, E)).astype(np.float32)) for _ in range(n)]
        bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
        w, i = cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)
        row = {"E": E, "k": k, "T": T}
        for v in ("naive", "threshold", "radix", "screened"):
            d = ds4kern.explain("router_topk", xs[0], k, score_function="sigmoid", expert_bias=bias, variant=None)
            if any(c.variant.name == v and c.rejected for c in d.candidates):
                continue
            t = cuda_graph_time(lambda j: ds4kern.router_topk(xs[j % n], k, score_function="sigmoid", expert_bias=bias,
                                                              out=(w, i), variant=v), inner=max(8, n), repeat=30)
            row[v] = round(t * 1e6, 2)
        rows.append(row)
        print(row, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
