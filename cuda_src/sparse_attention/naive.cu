// sparse_attention_naive<FP8> — sparse decode attention with an attention sink on CUDA cores: the
// GPU twin of the float64 reference, for any H, K and either KV format.
//
// Thread layout: one block of 8 warps per (query row n, head h).  Warp w takes the slots
// j = w, w + 8, ... (two at a time for overlap); lane i holds dims 16i .. 16i + 15 of q, of each
// gathered row and of its running output.  Each warp keeps its own online softmax (m, l, o); the
// 8 warps merge in shared memory, then each thread finishes two dims (sink, inverse RoPE, bf16).
//
// Bytes moved: every (n, h) block gathers its row's valid KV rows (1024 B bf16 / 584 B fp8 each),
// so the pool is read H times per query row (L2 may absorb some); q and o once (1 KB each).
#include "sparse_attention_common.cuh"

// Lane's 16 dims of one gathered row, as floats.
template <bool FP8>
__device__ __forceinline__ void naive_load_row(float (&v)[16], const unsigned char* row, int lane) {
    if constexpr (!FP8) {
        const uint4* p = reinterpret_cast<const uint4*>(row) + 2 * lane;
        const uint4 a = p[0], b = p[1];
        const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    } else if (lane < 28) {  // 16 e4m3 nope values of the 64-value tile lane / 4
        const uint2* p = reinterpret_cast<const uint2*>(row + 16 * lane);
        const uint2 a = p[0], b = p[1];
        const float scale = ds4_ue8m0(row[DS4_SA_FP8_SCALE_OFF + lane / 4]);
        const unsigned w[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = ds4_mul_keep_subnormals(ds4_e4m3_to_float((w[i / 4] >> (8 * (i % 4))) & 0xffu), scale);
    } else {  // 16 bf16 rope values (rows are 8-byte aligned: 8-byte loads)
        const uint2* p = reinterpret_cast<const uint2*>(row + DS4_SA_FP8_ROPE_OFF + 32 * (lane - 28));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint2 u = p[i];
            const float2 f0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
            const float2 f1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
            v[4 * i] = f0.x;
            v[4 * i + 1] = f0.y;
            v[4 * i + 2] = f1.x;
            v[4 * i + 3] = f1.y;
        }
    }
}

// One slot into a warp's online softmax (every lane holds the same m, l).
__device__ __forceinline__ void naive_add(float& m, float& l, float (&o)[16], float s, const float (&v)[16]) {
    const float mn = fmaxf(m, s);
    const float mu = mn == DS4_NEG_INF ? 0.0f : mn;  // nothing finite yet: exp2 of -inf - 0 is 0
    const float alpha = mn == DS4_NEG_INF ? 1.0f : ds4_exp2(m - mn);
    const float p = ds4_exp2(s - mu);  // a NaN score stays NaN
    l = __fmaf_rn(l, alpha, p);
#pragma unroll
    for (int i = 0; i < 16; ++i) o[i] = __fmaf_rn(o[i], alpha, p * v[i]);
    m = mn;
}

// sparse_attention_naive: grid N * H blocks (block b: row b / H, head b % H), 256 threads.
// Slots >= pool_rows or < -1 are skipped and counted in *errors by the head-0 block; an out-of-range
// position turns the rope dims NaN and is counted once per row.
template <bool FP8>
__global__ void __launch_bounds__(256, 1)  // (256) alone makes ptxas aim at 80 registers and spill
sparse_attention_naive(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv,
                       long long kv_stride, long long pool_rows, const int* __restrict__ indices, int K,
                       const float* __restrict__ sink, int H, float scale_log2,
                       const void* __restrict__ positions, int pos64, const float* __restrict__ rope_cos,
                       const float* __restrict__ rope_sin, long long max_pos, __nv_bfloat16* __restrict__ out,
                       float* __restrict__ lse, int* __restrict__ errors) {
    __shared__ float o_s[DS4_SA_WARPS][DS4_SA_DIM];
    __shared__ float m_s[DS4_SA_WARPS], l_s[DS4_SA_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long n = blockIdx.x / H;
    const int h = (int)(blockIdx.x % H);
    const bool counter = errors != nullptr && h == 0;

    float qv[16];
    {
        const uint4* p = reinterpret_cast<const uint4*>(q + (n * H + h) * DS4_SA_DIM) + 2 * lane;
        const uint4 a = p[0], b = p[1];
        const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
            qv[2 * i] = f.x;
            qv[2 * i + 1] = f.y;
        }
    }
    float m = DS4_NEG_INF, l = 0.0f, o[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) o[i] = 0.0f;

    const int* idx = indices + n * K;
    for (int j0 = warp; j0 < K; j0 += 2 * DS4_SA_WARPS) {
        const int j1 = j0 + DS4_SA_WARPS;
        const int s0 = idx[j0], s1 = j1 < K ? idx[j1] : -1;
        const bool ok0 = ds4_slot_ok(s0, pool_rows), ok1 = ds4_slot_ok(s1, pool_rows);
        if (counter && lane == 0) {
            if (ds4_slot_bad(s0, pool_rows)) atomicAdd(errors, 1);
            if (j1 < K && ds4_slot_bad(s1, pool_rows)) atomicAdd(errors, 1);
        }
        float v0[16], v1[16];
        if (ok0) naive_load_row<FP8>(v0, kv + (long long)s0 * kv_stride, lane);
        if (ok1) naive_load_row<FP8>(v1, kv + (long long)s1 * kv_stride, lane);
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            if (ok0) d0 = __fmaf_rn(qv[i], v0[i], d0);
            if (ok1) d1 = __fmaf_rn(qv[i], v1[i], d1);
        }
        d0 = ds4_warp_sum(d0);
        d1 = ds4_warp_sum(d1);
        if (ok0) naive_add(m, l, o, d0 * scale_log2, v0);
        if (ok1) naive_add(m, l, o, d1 * scale_log2, v1);
    }

#pragma unroll
    for (int i = 0; i < 16; ++i) o_s[warp][16 * lane + i] = o[i];
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    __syncthreads();

    // Merge the warps: weights exp2(m_w - M); a warp without slots (l_w == 0) adds nothing.
    float M = DS4_NEG_INF;
#pragma unroll
    for (int w = 0; w < DS4_SA_WARPS; ++w)
        if (l_s[w] != 0.0f) M = fmaxf(M, m_s[w]);
    const float mu = M == DS4_NEG_INF ? 0.0f : M;
    float L = 0.0f, x0 = 0.0f, x1 = 0.0f;
    const int d = 2 * threadIdx.x;
#pragma unroll
    for (int w = 0; w < DS4_SA_WARPS; ++w) {
        if (l_s[w] == 0.0f) continue;
        const float wt = ds4_exp2(m_s[w] - mu);
        L = __fmaf_rn(l_s[w], wt, L);
        x0 = __fmaf_rn(o_s[w][d], wt, x0);
        x1 = __fmaf_rn(o_s[w][d + 1], wt, x1);
    }
    const float inv = ds4_sa_inv_denominator(L, M, sink[h]);
    x0 *= inv;
    x1 *= inv;
    if (positions != nullptr && d >= DS4_SA_NOPE) {
        const long long pos = ds4_sa_position(positions, pos64, n);
        ds4_inverse_rope(x0, x1, rope_cos, rope_sin, pos, max_pos, (d - DS4_SA_NOPE) / 2);
        if (counter && d == DS4_SA_NOPE && (pos < 0 || pos >= max_pos)) atomicAdd(errors, 1);
    }
    reinterpret_cast<unsigned*>(out + (n * H + h) * DS4_SA_DIM)[threadIdx.x] = ds4_pack_bf16x2(x0, x1);
    if (lse != nullptr && threadIdx.x == 0) lse[n * H + h] = ds4_sa_lse(L, M);
}
