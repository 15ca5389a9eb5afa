// indexer_logits_naive<FP8> — the lightning indexer's logits on CUDA cores, the float64
// reference's GPU twin for any C and either key format:
//   logits[t, c] = sum_h w[t, h] * relu(scale_c * (q[t, h] . key[c]))   for c < lengths[t]
//
// Thread layout: one thread per key column, 256 columns per block, blocks over (token, run of
// 256 columns).  q[t] (64 heads x 128 dims) is staged in shared memory as float (32 KB); every
// thread of a warp reads the same q values at once (broadcast), keeps 64 float accumulators and
// walks its key row 8 dims at a time.  Then relu, times w[t, h], summed over the heads.
//
// Bytes moved: each key row of a column below lengths[t] once (256 B bf16 / 128 B + a 4-byte
// scale fp8), q[t] (16 KB, from L2 after the first block) and w[t] per block, 4 B of logits per
// column.  Blocks wholly beyond lengths[t] read nothing (and with fill_tail write -inf).
#include "indexer_common.cuh"

// 8 key values of one row, dims d0 .. d0 + 7, as float (fp8: the e4m3 value, unscaled).
template <bool FP8>
__device__ __forceinline__ void naive_load8(float (&k)[8], const unsigned char* row, int d0) {
    if constexpr (!FP8) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + 2 * d0);
        const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u[i]));
            k[2 * i] = f.x;
            k[2 * i + 1] = f.y;
        }
    } else {
        const uint2 v = *reinterpret_cast<const uint2*>(row + d0);
#pragma unroll
        for (int i = 0; i < 8; ++i) k[i] = ds4_ix_e4m3(((i < 4 ? v.x : v.y) >> (8 * (i & 3))) & 0xffu);
    }
}

// indexer_logits_naive: grid T * col_blocks blocks (block b: token b / col_blocks, columns
// 256 * (b % col_blocks) ..), 256 threads, 32.25 KB static shared memory.  fill_tail: write -inf to
// the columns in [lengths[t], C) (the user-visible logits); otherwise they are left untouched.
template <bool FP8>
__global__ void __launch_bounds__(DS4_IX_NAIVE_THREADS, 1)  // (256) alone caps ptxas at 128 registers: spills
indexer_logits_naive(const __nv_bfloat16* __restrict__ q, const float* __restrict__ w,
                     const unsigned char* __restrict__ keys, const float* __restrict__ key_scales,
                     const int* __restrict__ block_table, int max_pages, long long pages, int C, int per_token,
                     const int* __restrict__ lengths, int col_blocks, float* __restrict__ logits, int fill_tail,
                     int* __restrict__ errors) {
    __shared__ __align__(16) float q_s[DS4_IX_HEADS * DS4_IX_DIM];
    __shared__ float w_s[DS4_IX_HEADS];
    constexpr int ROW_BYTES = FP8 ? DS4_IX_DIM : 2 * DS4_IX_DIM;
    const long long t = blockIdx.x / col_blocks;
    const int cb = (int)(blockIdx.x % col_blocks);
    const int c = cb * DS4_IX_NAIVE_THREADS + (int)threadIdx.x;
    bool bad_len;
    const int len = ds4_ix_length(lengths, t, C, bad_len);
    if (errors != nullptr && bad_len && cb == 0 && threadIdx.x == 0) atomicAdd(errors, 1);
    float* out = logits + t * C + c;
    if (cb * DS4_IX_NAIVE_THREADS >= len) {  // the whole block is beyond the length
        if (fill_tail && c < C) *out = DS4_NEG_INF;
        return;
    }

    const uint4* qg = reinterpret_cast<const uint4*>(q + t * (DS4_IX_HEADS * DS4_IX_DIM));
    for (int i = threadIdx.x; i < DS4_IX_HEADS * DS4_IX_DIM / 8; i += DS4_IX_NAIVE_THREADS) {
        const uint4 v = qg[i];
        const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u[j]));
            q_s[8 * i + 2 * j] = f.x;
            q_s[8 * i + 2 * j + 1] = f.y;
        }
    }
    if (threadIdx.x < DS4_IX_HEADS) w_s[threadIdx.x] = w[t * DS4_IX_HEADS + threadIdx.x];
    __syncthreads();
    if (c >= C) return;
    if (c >= len) {
        if (fill_tail) *out = DS4_NEG_INF;
        return;
    }
    const long long row0 = ds4_ix_block_row(per_token ? (int)t : 0, c / DS4_IX_PAGE, C, block_table, max_pages, pages);
    if (row0 < 0) {  // bad page: counted by the thread of its first column, which is below len
        if (errors != nullptr && c % DS4_IX_PAGE == 0) atomicAdd(errors, 1);
        *out = DS4_NEG_INF;
        return;
    }
    const long long row = row0 + c % DS4_IX_PAGE;
    const unsigned char* krow = keys + row * ROW_BYTES;

    float acc[DS4_IX_HEADS];
#pragma unroll
    for (int h = 0; h < DS4_IX_HEADS; ++h) acc[h] = 0.0f;
#pragma unroll 1
    for (int d0 = 0; d0 < DS4_IX_DIM; d0 += 8) {
        float k[8];
        naive_load8<FP8>(k, krow, d0);
#pragma unroll
        for (int h = 0; h < DS4_IX_HEADS; ++h) {
            const float4 a = *reinterpret_cast<const float4*>(&q_s[h * DS4_IX_DIM + d0]);
            const float4 b = *reinterpret_cast<const float4*>(&q_s[h * DS4_IX_DIM + d0 + 4]);
            float s = acc[h];
            s = __fmaf_rn(a.x, k[0], s);
            s = __fmaf_rn(a.y, k[1], s);
            s = __fmaf_rn(a.z, k[2], s);
            s = __fmaf_rn(a.w, k[3], s);
            s = __fmaf_rn(b.x, k[4], s);
            s = __fmaf_rn(b.y, k[5], s);
            s = __fmaf_rn(b.z, k[6], s);
            s = __fmaf_rn(b.w, k[7], s);
            acc[h] = s;
        }
    }
    const float scale = FP8 ? key_scales[row] : 1.0f;
    float score = 0.0f;
#pragma unroll
    for (int h = 0; h < DS4_IX_HEADS; ++h) score = __fmaf_rn(w_s[h], ds4_ix_relu(acc[h] * scale), score);
    *out = score;
}
