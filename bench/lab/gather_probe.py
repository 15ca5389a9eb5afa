"""What random gathers cost on this GPU: the floor of the backward from dense indices.

The backward from dense indices (router_topk_backward with int indices) reads, per token, its k
index entries and the gradient (logits dtype) and the float32 intermediate at those k experts,
and writes the full [T, E] gradient row.  The gathers touch one 32-byte sector each, at random
places.  This probe times, with CUDA-graph replay and inputs rotating beyond L2:
  - the gathers alone (a thread per (token, slot): index, gradient and intermediate loads, one
    float written per thread so nothing is optimised away),
  - the output's zero fill alone (memset),
  - both in one graph (gathers, then the fill),
next to the copy bandwidth of the same run, for Flash routing (E=256, k=6), T=65536.

    python bench/lab/gather_probe.py [--tokens 65536]      (GPU machine)
"""

import numpy as np

from bwd_idx_probe import E, K, backward_inputs, minimal_bytes, probe_setup, zero_fill  # (bench/ is the script's folder)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.timing import cuda_graph_time

SRC = r"""
#include <cuda_bf16.h>
template <typename T>
__device__ __forceinline__ float tof(T v) { return (float)v; }
template <>
__device__ __forceinline__ float tof<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__global__ void gathers(const T* __restrict__ g, const float* __restrict__ act, const int* __restrict__ idx,
                        long long n, int E, int k, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long t = i / k;
    const int e = idx[i];
    out[i] = tof(__ldg(g + t * E + e)) * __ldg(act + t * E + e);
}
"""


def main():
    import cupy as cp
    T, rng, bw = probe_setup()
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=["gathers<float>", "gathers<__nv_bfloat16>"])
    for dt_name, dt, cname in (("float32", np.float32, "float"), ("bfloat16", BFLOAT16, "__nv_bfloat16")):
        n, gs, acts, idx, outs = backward_inputs(cp, rng, T, dt)
        sink = cp.empty(T * K, cp.float32)
        kern = mod.get_function(f"gathers<{cname}>")
        m = T * K

        def gather(j):
            kern(((m + 255) // 256,), (256,), (gs[j % n], acts[j % n], idx[j % n], np.int64(m), np.int32(E),
                                               np.int32(K), sink))

        def fill(j):
            zero_fill(cp, outs[j % n])

        def both(j):
            gather(j)
            fill(j)

        minimal = minimal_bytes(T, np.dtype(dt).itemsize)
        sectors = 2 * T * K  # one 32-byte sector per gathered value
        for name, fn in (("gathers alone", gather), ("zero fill alone", fill), ("gathers, then the fill", both)):
            t = cuda_graph_time(fn, inner=max(10, n))
            extra = f"  {sectors * 32 / t / 1e9:6.0f} GB/s of sectors" if name != "zero fill alone" else ""
            print(f"{dt_name:9s} {name:24s} {t * 1e6:8.2f} us  (50% of copy over the minimal bytes: "
                  f"{minimal / (0.5 * bw) * 1e6:.1f} us){extra}", flush=True)


if __name__ == "__main__":
    main()
