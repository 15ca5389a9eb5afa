"""Host-side cost of one router_topk call, broken down (GPU machine).

    python bench/core/overhead.py [--profile]

Prints µs per call for: a bare RawKernel launch with prepared arguments, the full
``router_topk`` call, and (with --profile) the top functions by own time.
"""

import argparse
import cProfile
import pstats

import cupy as cp
import numpy as np

import ds4kern
from ds4kern.ops import router as r
from ds4kern.core.timing import host_time


def per_call(fn, n=3000):
    return host_time(fn, n) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    T, E, k = 128, 256, 6
    x = cp.asarray(np.random.default_rng().standard_normal((T, E), dtype=np.float32))
    bias = cp.asarray(np.random.default_rng().standard_normal(E).astype(np.float32))
    w, i = cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)
    kern = r.ROUTER_KERNELS.kernel(r._naive_name("float32", 8))
    kargs = (x, bias, np.int64(T), np.int32(E), np.int32(k), np.int32(2), np.int32(0), np.float32(1.5),
             w, np.int64(k), np.int64(1), i, np.int64(k), np.int64(1), np.int32(3), np.int32(0), np.int32(0))
    full = lambda: ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias,  # noqa: E731
                                       scaling_factor=1.5, out=(w, i))
    alloc = lambda: ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias,  # noqa: E731
                                        scaling_factor=1.5)
    print(f"bare RawKernel launch       {per_call(lambda: kern((32,), (128,), kargs)):7.1f} us")
    print(f"router_topk(out=...)        {per_call(full):7.1f} us")
    print(f"router_topk (allocating)    {per_call(alloc):7.1f} us")
    print(f"cupy.empty x2               {per_call(lambda: (cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32))):7.1f} us")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            full()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
