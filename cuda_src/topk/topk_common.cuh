// topk_rows: shared device code of the radix and sort kernels.
//
// Keys: ds4_order_key (common.cuh) maps a score to a uint32 whose unsigned order is the score
// order (NaN lowest, -0 == +0); 0 means "no element" (beyond a row's length, padding).  A winner
// is kept as the 64-bit word (key << 32) | ~position, so that one unsigned comparison orders by
// key and then by the lower position (= the lower column: positions follow column order).
#pragma once
#include "../common/common.cuh"

#define DS4_TOPK_THREADS 512
#define DS4_TOPK_WARPS (DS4_TOPK_THREADS / 32)
#define DS4_TOPK_MAX_K 2048
#define DS4_TOPK_BINS 256

// Scores as float bits, exactly (bf16 by its bits: no conversion instruction in between).
__device__ __forceinline__ float ds4_topk_float(float x) { return x; }
__device__ __forceinline__ float ds4_topk_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float ds4_topk_float(__nv_bfloat16 x) {
    return __uint_as_float((unsigned)__bfloat16_as_ushort(x) << 16);
}

// ds4_topk_order: ds4_order_key by bits alone.  CuPy compiles with -ftz=true, under which a float
// comparison takes a subnormal for zero; here NaN -> 1, -0 -> +0, then sign flip / bit-not, and
// subnormals keep their own keys, as in the reference.
__device__ __forceinline__ unsigned ds4_topk_order(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 1u;
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long ds4_topk_word(unsigned key, unsigned pos) {
    return ((unsigned long long)key << 32) | (unsigned long long)(0xffffffffu - pos);
}

__device__ __forceinline__ unsigned ds4_topk_word_pos(unsigned long long w) {
    return 0xffffffffu - (unsigned)(w & 0xffffffffu);
}

// Exclusive prefix sum of one 64-bit value per thread over the block (in thread order); the
// block total through `total`.  `wsum`: DS4_TOPK_WARPS words of shared memory.  Every thread of
// the block must call it (it synchronises).
__device__ __forceinline__ unsigned long long ds4_topk_block_scan(unsigned long long v, unsigned long long* wsum,
                                                                  unsigned long long& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned long long s = lane < DS4_TOPK_WARPS ? wsum[lane] : 0ull;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            unsigned long long y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < DS4_TOPK_WARPS) wsum[lane] = s;
    }
    __syncthreads();
    unsigned long long before = (warp ? wsum[warp - 1] : 0ull) + x - v;
    total = wsum[DS4_TOPK_WARPS - 1];
    __syncthreads();  // wsum may be reused at once
    return before;
}

// Sorts a[0, n) descending; n a power of two <= 2 * DS4_TOPK_THREADS * 8.  Every thread calls it.
__device__ __forceinline__ void ds4_topk_bitonic_desc(unsigned long long* a, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int j = size >> 1; j > 0; j >>= 1) {
            for (int p = threadIdx.x; p < (n >> 1); p += DS4_TOPK_THREADS) {
                const int i = ((p / j) * 2 * j) + (p % j), l = i + j;
                const unsigned long long x = a[i], y = a[l];
                const bool desc = (i & size) == 0;
                if (desc ? (x < y) : (x > y)) {
                    a[i] = y;
                    a[l] = x;
                }
            }
            __syncthreads();
        }
    }
}

__device__ __forceinline__ int ds4_topk_pow2(int n) {
    int p = 1;
    while (p < n) p <<= 1;
    return p;
}
