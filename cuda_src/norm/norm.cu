// rms_norm / rope_rotate: the small row operations of a DeepSeek-V4 block, one launch each (a
// composite of array operations takes 5-10 launches for either).
//
// rms_norm_rows: one block of 256 threads per row of x [N, D] (rows `stride` elements apart, the
// last axis contiguous): s = sum of x^2 in float32 (per-thread strided partial sums, then a
// warp and a block reduction), r = 1 / sqrt(s / D + eps), out[i] = x[i] * r * w[i] (w optional),
// stored as float32 or bf16 into out [N, D] (contiguous).  Reads each row twice (the second
// time from L1/L2), writes it once.
//
// rope_rotate_rows: rotates in place the interleaved pairs (2i, 2i + 1), i < 32, of the 64 values
// at column `start` of every row of x [N, H, d] (rows of one token share its position:
// token n = row / H): x0' = x0 c - x1 s, x1' = x0 s + x1 c with (c, s) = (cos, sin)[pos[n], i]
// (s negated when `inverse`).  Positions outside [0, max_pos) leave the row unchanged and are
// counted in *errors when given.  One thread per pair, 8 rows per 256-thread block.
#include "../common/common.cuh"

#define DS4_NORM_THREADS 256

__device__ __forceinline__ float ds4_norm_load(const float* p) { return *p; }
__device__ __forceinline__ float ds4_norm_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ds4_norm_load(const __nv_bfloat16* p) {
    return __uint_as_float((unsigned)__bfloat16_as_ushort(*p) << 16);
}

__device__ __forceinline__ void ds4_norm_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void ds4_norm_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename Tin, typename Tout, bool HAS_W>
__global__ void __launch_bounds__(DS4_NORM_THREADS)
rms_norm_rows(const Tin* __restrict__ x, long long stride, int D, const float* __restrict__ w, float eps,
              Tout* __restrict__ out) {
    __shared__ float wsum[DS4_NORM_THREADS / 32];
    const Tin* row = x + (long long)blockIdx.x * stride;
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += DS4_NORM_THREADS) {
        const float v = ds4_norm_load(row + i);
        s = fmaf(v, v, s);
    }
    s = ds4_warp_sum(s);
    if ((threadIdx.x & 31) == 0) wsum[threadIdx.x >> 5] = s;
    __syncthreads();
    float tot = 0.0f;
#pragma unroll
    for (int i = 0; i < DS4_NORM_THREADS / 32; ++i) tot += wsum[i];
    const float r = 1.0f / sqrtf(tot / (float)D + eps);
    Tout* o = out + (long long)blockIdx.x * D;
    for (int i = threadIdx.x; i < D; i += DS4_NORM_THREADS) {
        float v = ds4_norm_load(row + i) * r;
        if (HAS_W) v *= w[i];
        ds4_norm_store(o + i, v);
    }
}

template <typename T>
__global__ void __launch_bounds__(DS4_NORM_THREADS)
rope_rotate_rows(T* __restrict__ x, long long rows, int H, int d, int start, const long long* __restrict__ pos,
                 const float* __restrict__ cos_t, const float* __restrict__ sin_t, long long max_pos, int inverse,
                 int* __restrict__ errors) {
    const long long row = (long long)blockIdx.x * (DS4_NORM_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int i = threadIdx.x & 31;
    const long long p = pos[row / H];
    if (p < 0 || p >= max_pos) {
        if (errors != nullptr && i == 0 && row % H == 0) atomicAdd(errors, 1);
        return;
    }
    const float c = cos_t[p * 32 + i], s = inverse ? -sin_t[p * 32 + i] : sin_t[p * 32 + i];
    T* v = x + row * d + start + 2 * i;
    const float x0 = ds4_norm_load(v), x1 = ds4_norm_load(v + 1);
    ds4_norm_store(v, x0 * c - x1 * s);
    ds4_norm_store(v + 1, x0 * s + x1 * c);
}
