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
from ds4kern.core.op import get_op
from ds4kern.core.timing import host_time
from ds4kern.ops.router import kernels as K
from ds4kern.ops.router.api import SCORE_FUNCTIONS
from ds4kern.ops.router.variants import output_args


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
    # the naive variant's launch with the arguments its launcher passes, prepared once
    a = get_op("router_topk").prepare(x, k, score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5,
                                      out=(w, i)).args
    vpl = next(v for v in K.NAIVE_VPL if 32 * v >= E)
    kern = K.NAIVE.kernel(K.naive_name("float32", vpl))
    grid = (T + K.NAIVE_WARPS_PER_BLOCK - 1) // K.NAIVE_WARPS_PER_BLOCK
    kargs = (a.logits, a.expert_bias, np.int64(T), np.int32(E), np.int32(k), np.int32(SCORE_FUNCTIONS["sqrtsoftplus"]),
             np.int32(0), np.float32(1.5)) + output_args(a) + (np.int32(a.num_groups), np.int32(a.group_topk))
    full = lambda: ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias,  # noqa: E731
                                       scaling_factor=1.5, out=(w, i))
    alloc = lambda: ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias,  # noqa: E731
                                        scaling_factor=1.5)
    print(f"bare RawKernel launch       {per_call(lambda: kern((grid,), (32 * K.NAIVE_WARPS_PER_BLOCK,), kargs)):7.1f} us")
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
