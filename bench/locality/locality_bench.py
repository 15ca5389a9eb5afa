"""Offline locality analysis speed: a 1,000,000 tokens x 43 layers x 6 capture (CPU).

    python bench/locality/locality_bench.py [--tokens 1000000] [--layers 43]
"""

import argparse
import os
import time

import numpy as np

from ds4kern.locality import analyze


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="workers (default: min(16, cores))")
    ap.add_argument("--threads", action="store_true", help="worker threads instead of forked processes")
    args = ap.parse_args()
    rng = np.random.default_rng()
    # each record: 6 distinct experts drawn with a skewed popularity (some locality)
    T, L, E, k = args.tokens, args.layers, args.experts, 6
    arr = np.empty((T, L, k), np.uint8 if E <= 256 else np.int32)
    for j in range(k):  # skewed popularity (power law on [0, E)); distinct per record by offsets
        arr[:, :, j] = ((E * rng.random((T, L), np.float32) ** 3).astype(np.int32) + 37 * j) % E
    if args.threads:
        import ds4kern.locality.analysis as loc

        loc._can_fork = lambda: False
    t0 = time.perf_counter()
    rep = analyze(arr, E, hash_layers=(0, 1, 2), workers=args.workers)
    dt = time.perf_counter() - t0
    kind = "threads" if args.threads else "processes"
    print(f"{os.cpu_count()} cores, {args.workers or min(16, os.cpu_count())} {kind}; {T} tokens x {L} layers x {k}: {dt:.1f} s ({dt / L:.2f} s per layer); "
          f"LRU hit rate at 16 experts: {rep['cache_summary'][4]['hit_rate']:.3f}")


if __name__ == "__main__":
    main()
