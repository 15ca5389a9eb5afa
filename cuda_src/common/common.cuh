// Shared device helpers for ds4kern kernels: dtype conversion and an order-preserving float key.
// Folded into each kernel source by the package's loader (so the compile cache sees every edit).
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

// Index outputs of a run-time integer type (a uniform switch per store; stores are few).
#define DS4_IDX_U8 0
#define DS4_IDX_U16 1
#define DS4_IDX_I16 2
#define DS4_IDX_I32 3
#define DS4_IDX_I64 4

__device__ __forceinline__ void ds4_store_index(void* base, int kind, long long off, int v) {
    switch (kind) {
        case DS4_IDX_U8: static_cast<unsigned char*>(base)[off] = (unsigned char)v; break;
        case DS4_IDX_U16: static_cast<unsigned short*>(base)[off] = (unsigned short)v; break;
        case DS4_IDX_I16: static_cast<short*>(base)[off] = (short)v; break;
        case DS4_IDX_I32: static_cast<int*>(base)[off] = v; break;
        default: static_cast<long long*>(base)[off] = (long long)v; break;
    }
}

__device__ __forceinline__ int ds4_load_index(const void* base, int kind, long long off) {
    switch (kind) {
        case DS4_IDX_U8: return static_cast<const unsigned char*>(base)[off];
        case DS4_IDX_U16: return static_cast<const unsigned short*>(base)[off];
        case DS4_IDX_I16: return static_cast<const short*>(base)[off];
        case DS4_IDX_I32: return static_cast<const int*>(base)[off];
        default: return (int)static_cast<const long long*>(base)[off];
    }
}
