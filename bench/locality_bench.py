"""Offline locality analysis speed: a 1,000,000 tokens x 43 layers x 6 capture (CPU).

    python bench/locality_bench.py [--tokens 1000000] [--layers 43]
"""

import argparse
import time

import numpy as np

from ds4kern.locality import analyze


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--experts", type=int, default=256)
    args = ap.parse_args()
    rng = np.random.default_rng()
    # each record: 6 distinct experts drawn with a skewed popularity (some locality)
    T, L, E, k = args.tokens, args.layers, args.experts, 6
    pop = rng.zipf(1.3, size=(T, L, 16)) % E
    arr = np.empty((T, L, k), np.uint8)
    for j in range(k):  # distinct per record: offset duplicates
        arr[:, :, j] = (pop[:, :, j] + 37 * j) % E
    t0 = time.perf_counter()
    rep = analyze(arr, E, hash_layers=(0, 1, 2))
    dt = time.perf_counter() - t0
    print(f"{T} tokens x {L} layers x {k}: {dt:.1f} s ({dt / L:.2f} s per layer); "
          f"LRU hit rate at 16 experts: {rep['cache_summary'][4]['hit_rate']:.3f}")


if __name__ == "__main__":
    main()
