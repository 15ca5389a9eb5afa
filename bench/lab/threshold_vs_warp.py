"""Lab: router_topk `threshold` against the warp kernel (`screened`) built with more values per
lane, at E = 640 and 1024 where the library's warp kernel (VPL <= 16, E <= 512) cannot run.

The warp kernel is compiled here from the library's own source (cuda_src/router/warp.cu) with
extra instantiations (VPL 20 and 32); nothing of this is shipped.  Outputs are checked against
the reference (indices equal except rows with float32 near-ties), then both are timed from
CUDA-graph replays with inputs rotated through more than the L2 holds.

    python bench/lab/threshold_vs_warp.py [--tokens 128 4096 16384 65536] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import ds4kern
from ds4kern.core import kernels
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name
from ds4kern.ops.router import kernels as K
from ds4kern.ops.router.variants import output_args

ROTATE_BYTES = 256 << 20


def warp_module(cp, dtype, vpls):
    names = [K.warp_name(dtype, K.WARP_SF[("sqrtsoftplus", False)], False, v) for v in vpls]
    mod = cp.RawModule(code=kernels.load_source(K.WARP.source), options=K.WARP.options, name_expressions=names)
    return {v: mod.get_function(n) for v, n in zip(vpls, names)}


class Args:  # what output_args reads
    def __init__(self, w, i, idx):
        self.weights, self.indices = w, i
        self.problem = type("P", (), {"index_dtype": idx})()


def launch_warp(cp, kern, x, bias, k, w, i, sms):
    T, E = x.shape
    warps = K.WARP_THREADS // 32
    grid = min((T + warps - 1) // warps, K.WARP_BLOCKS_PER_SM * sms)
    vpl = -(-E // 32)
    vec = int(x.data.ptr % 16 == 0 and (E * x.itemsize) % 16 == 0 and E >= vpl)
    kern((grid,), (K.WARP_THREADS,),
         (x, bias, np.int64(T), np.int32(E), np.int32(k), np.float32(1.5), np.int32(vec))
         + output_args(Args(w, i, "int32")) + (np.int32(0), np.int32(0), np.int32(0)))


def main() -> int:
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 4096, 16384, 65536])
    ap.add_argument("--experts", type=int, nargs="+", default=[640, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    copy = copy_bandwidth()
    print(f"{device_name()}: copy {copy / 1e9:.0f} GB/s; sqrtsoftplus + bias, k={a.k}; graph-replay us")
    rows = []
    rng = np.random.default_rng(0)
    for dtype in a.dtypes:
        try:
            mods = warp_module(cp, dtype, (20, 32))
        except Exception as e:  # noqa: BLE001  (a lab probe: say why and stop)
            print(f"warp kernel with VPL 20/32 did not build for {dtype}: {e}")
            continue
        for E in a.experts:
            vpl = 20 if E <= 640 else 32
            bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
            for T in a.tokens:
                item = np.dtype(np.float32 if dtype == "float32" else BFLOAT16).itemsize
                n = max(2, min(64, ROTATE_BYTES // (T * E * item)))
                xs = [cp.asarray(rng.standard_normal((T, E)).astype(np.float32)).astype(
                    np.float32 if dtype == "float32" else BFLOAT16) for _ in range(n)]
                w = cp.empty((T, a.k), cp.float32)
                i = cp.empty((T, a.k), cp.int32)
                # correctness of the lab build against the library (threshold) on the first input
                launch_warp(cp, mods[vpl], xs[0], bias, a.k, w, i, sms)
                _, i_thr = ds4kern.router_topk(xs[0], a.k, score_function="sqrtsoftplus", expert_bias=bias,
                                               scaling_factor=1.5, variant="threshold")
                differ = int((cp.asnumpy(i) != cp.asnumpy(i_thr)).any(axis=1).sum())
                it = iter(range(1 << 30))

                def warp_call(_j):
                    launch_warp(cp, mods[vpl], xs[next(it) % n], bias, a.k, w, i, sms)

                def thr_call(_j):
                    ds4kern.router_topk(xs[next(it) % n], a.k, score_function="sqrtsoftplus", expert_bias=bias,
                                        scaling_factor=1.5, out=(w, i), variant="threshold")

                t_w = cuda_graph_time(warp_call) * 1e6
                t_t = cuda_graph_time(thr_call) * 1e6
                frac = lambda t: T * (E * item + a.k * 8) / (t * 1e-6) / copy  # noqa: E731
                rows.append(dict(dtype=dtype, E=E, T=T, warp_vpl=vpl, warp_us=t_w, threshold_us=t_t,
                                 rows_differing=differ))
                print(f"{dtype:8s} E={E:5d} T={T:6d}  warp(VPL {vpl}) {t_w:8.2f} us ({frac(t_w):5.1%})  "
                      f"threshold {t_t:8.2f} us ({frac(t_t):5.1%})  rows differing {differ}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=device_name(), copy_bytes_per_s=copy, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
