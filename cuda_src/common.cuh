// Shared device helpers for ds4kern kernels: dtype conversion and an order-preserving float key.
// Folded into each kernel source by ds4kern.kernels (so the compile cache sees every edit).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <cmath>: spell the infinities out.
#define DS4_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ds4_to_float(float x) { return x; }
__device__ __forceinline__ float ds4_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float ds4_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Selection key: larger score -> larger key, one total order for every float.
//   0          : reserved for "no candidate" (padding lanes, already selected experts)
//   1          : NaN, so a NaN is picked only when no number is left
//   2 ..       : numbers, -inf lowest, +inf highest; -0 and +0 share one key (they tie, as in
//                a plain float comparison) so the lower index wins between them.
__device__ __forceinline__ unsigned ds4_order_key(float f) {
    if (f != f) return 1u;
    if (f == 0.0f) f = 0.0f;  // fold -0 onto +0
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    // -inf = 0xff800000 maps to 0x007fffff, well above 1.
}

__device__ __forceinline__ float ds4_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float ds4_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
