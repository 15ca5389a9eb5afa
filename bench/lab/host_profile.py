"""Lab: host cost of one op call (no sync), and where it goes (cProfile), for whichever ds4kern
PYTHONPATH points at -- run it on an old tree and this one to compare.

    PYTHONPATH=<tree> python bench/lab/host_profile.py [--calls 20000] [--profile]

Calls: router_topk (Flash: E=256, k=6, sqrtsoftplus + bias, float32, T=128, out= given) and
compress_kv decode (the compressor bench's R=4 d=512 B=1 shape) if the tree has it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import cupy as cp
import numpy as np

import ds4kern


def router_call():
    T, E, K = 128, 256, 6
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((T, E), dtype=np.float32))
    b = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
    w, i = cp.empty((T, K), cp.float32), cp.empty((T, K), cp.int32)
    return lambda: ds4kern.router_topk(x, K, score_function="sqrtsoftplus", expert_bias=b,
                                       scaling_factor=1.5, out=(w, i))


def per_call(fn, n):
    # its own loop, not ds4kern.core.timing.host_time: the old trees this runs on have no core package
    for _ in range(200):
        fn()
    cp.cuda.Device().synchronize()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n)
        cp.cuda.Device().synchronize()
    return sorted(best)[len(best) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    print(f"ds4kern from {ds4kern.__file__}")
    fn = router_call()
    t = per_call(fn, a.calls // 5)
    print(f"router_topk T=128 flash: {t * 1e6:.1f} us host per call")
    fn0 = lambda: cp.cuda.runtime.getDevice()  # noqa: E731  (floor: a trivial CUDA runtime call)
    print(f"cupy getDevice: {per_call(fn0, a.calls // 5) * 1e6:.2f} us")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            fn()
        pr.disable()
        cp.cuda.Device().synchronize()
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(22)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
