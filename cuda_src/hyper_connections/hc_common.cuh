// Device helpers shared by the hyper-connection kernels (pre.cu, post_pre.cu, post.cu):
// vector loads / stores of V consecutive stream elements (V = 4: one 16-byte float32 or 8-byte
// bf16 access; V = 1: scalar, for misaligned arrays or D not a multiple of 4), the warp
// reduce-scatter and block reduction of the per-token mix values, and the finish of one token
// (RMS factor, sigmoids, row softmax and Sinkhorn iterations on the 4x4 matrix in registers).
#pragma once
#include "../common/common.cuh"

#define DS4_HC_STREAMS 4
#define DS4_HC_MIX 24         // 4 pre | 4 post | 16 comb
#define DS4_HC_SLOT 32        // reduced values per token: 24 dot products, the sum of squares, 7 zeros
#define DS4_HC_POST_THREADS 128

// How a stream array is read.  NC: read-only path (arrays no block of the launch writes).
// CG: L2 only, bypassing L1 (values other blocks or this block wrote earlier in the launch).
// PLAIN: ordinary coherent loads (X in the post kernels, which may be updated in place).
#define DS4_HC_LD_NC 0
#define DS4_HC_LD_CG 1
#define DS4_HC_LD_PLAIN 2

__device__ __forceinline__ float hc_bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hc_bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ float hc_bf16_bits(unsigned short u) { return __uint_as_float((unsigned)u << 16); }

template <int MODE, typename U>
__device__ __forceinline__ U hc_ld(const U* p) {
    if constexpr (MODE == DS4_HC_LD_NC) return __ldg(p);
    else if constexpr (MODE == DS4_HC_LD_CG) return __ldcg(p);
    else return *p;
}

// v[e] = float(p[e]) for e < V.  V = 4 needs p aligned to 4 elements.
template <int MODE, int V>
__device__ __forceinline__ void hc_load(const float* p, float (&v)[V]) {
    if constexpr (V == 4) {
        const float4 q = hc_ld<MODE>(reinterpret_cast<const float4*>(p));
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = hc_ld<MODE>(p + e);
    }
}

template <int MODE, int V>
__device__ __forceinline__ void hc_load(const __nv_bfloat16* p, float (&v)[V]) {
    if constexpr (V == 4) {
        const uint2 q = hc_ld<MODE>(reinterpret_cast<const uint2*>(p));
        v[0] = hc_bf16_lo(q.x); v[1] = hc_bf16_hi(q.x); v[2] = hc_bf16_lo(q.y); v[3] = hc_bf16_hi(q.y);
    } else {
        const unsigned short* u = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = hc_bf16_bits(hc_ld<MODE>(u + e));
    }
}

__device__ __forceinline__ unsigned short hc_bf16_rn(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// Store v (V elements) at p in T, and replace v by the values as stored (rounded to T), so a
// caller that goes on computing with v sees what a later reader of p would.
template <int V>
__device__ __forceinline__ void hc_store_round(float* p, float (&v)[V]) {
    if constexpr (V == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) p[e] = v[e];
    }
}

template <int V>
__device__ __forceinline__ void hc_store_round(__nv_bfloat16* p, float (&v)[V]) {
    unsigned short b[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
        b[e] = hc_bf16_rn(v[e]);
        v[e] = hc_bf16_bits(b[e]);
    }
    if constexpr (V == 4) {
        *reinterpret_cast<uint2*>(p) = make_uint2((unsigned)b[0] | ((unsigned)b[1] << 16),
                                                  (unsigned)b[2] | ((unsigned)b[3] << 16));
    } else {
        unsigned short* u = reinterpret_cast<unsigned short*>(p);
#pragma unroll
        for (int e = 0; e < V; ++e) u[e] = b[e];
    }
}

// Reduce N = 32 * M values over a warp with N - M shuffles instead of 5 N: at each of the five
// steps (OFF = 16, 8, 4, 2, 1) a lane keeps one half of its live values and hands the other half
// to its partner.  Lane l ends with the warp totals of values [l * M, l * M + M) in v[0 .. M).
// (The steps are a template recursion so that every index is a compile-time constant and v
// stays in registers.)
template <int HALF, int OFF, int N>
__device__ __forceinline__ void hc_reduce_scatter_step(float (&v)[N], int lane) {
    const bool upper = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        const float keep = upper ? v[i + HALF] : v[i];
        const float send = upper ? v[i] : v[i + HALF];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    if constexpr (OFF > 1) hc_reduce_scatter_step<HALF / 2, OFF / 2, N>(v, lane);
}

template <int N>
__device__ __forceinline__ void hc_warp_reduce_scatter(float (&v)[N], int lane) {
    static_assert(N % 32 == 0, "N is a multiple of 32");
    hc_reduce_scatter_step<N / 2, 16, N>(v, lane);
}

// Block-wide sums of acc[t][0..24] (24 dot products and the sum of squares of token t) into
// tot[t * 32 + k].  red: shared scratch of NW * 32 * TOK floats.  Ends with __syncthreads().
template <int TOK, int NT>
__device__ __forceinline__ void hc_block_reduce(const float (&acc)[TOK][DS4_HC_MIX + 1], float* red, float* tot) {
    constexpr int N = DS4_HC_SLOT * TOK;
    constexpr int NW = NT / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float v[N];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int k = 0; k < DS4_HC_SLOT; ++k) v[t * DS4_HC_SLOT + k] = k <= DS4_HC_MIX ? acc[t][k] : 0.0f;
    }
    hc_warp_reduce_scatter<N>(v, lane);
#pragma unroll
    for (int i = 0; i < TOK; ++i) red[warp * N + lane * TOK + i] = v[i];
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += NT) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; ++w) a += red[w * N + i];
        tot[i] = a;
    }
    __syncthreads();
}

// What the finish needs besides the reduced values.  hc_scale comes by value (checked on the
// host) or, when scale_ptr is not null, from device memory.
struct HcCoef {
    const float* scale_ptr;
    float s0, s1, s2;
    const float* base;  // [24]
    float norm_eps, hc_eps;
    int iters;          // Sinkhorn iterations in all (the softmax step counts as the first)
    float n;            // 4 * D, the length of the mean square
};

__device__ __forceinline__ float hc_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// One token: tot[0..23] the dot products of its flattened streams with hc_fn's rows, tot[24]
// the sum of squares.  Writes pre[4], post[4] and comb[16] (row-major C[in][out]).
__device__ __forceinline__ void hc_finish(const float* tot, const HcCoef& c, float* pre, float* post,
                                          float* comb) {
    float s0 = c.s0, s1 = c.s1, s2 = c.s2;
    if (c.scale_ptr != nullptr) {
        s0 = c.scale_ptr[0];
        s1 = c.scale_ptr[1];
        s2 = c.scale_ptr[2];
    }
    const float r = 1.0f / sqrtf(tot[DS4_HC_MIX] / c.n + c.norm_eps);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        pre[h] = hc_sigmoid(tot[h] * r * s0 + c.base[h]) + c.hc_eps;
        post[h] = 2.0f * hc_sigmoid(tot[4 + h] * r * s1 + c.base[4 + h]);
    }
    float C[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) C[q] = tot[8 + q] * r * s2 + c.base[8 + q];
    // softmax over each row (fmaxf skips a NaN, but exp(NaN - m) keeps the row NaN)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float m = fmaxf(fmaxf(C[4 * i], C[4 * i + 1]), fmaxf(C[4 * i + 2], C[4 * i + 3]));
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            C[4 * i + j] = expf(C[4 * i + j] - m);
            s += C[4 * i + j];
        }
        const float inv = 1.0f / s;
#pragma unroll
        for (int j = 0; j < 4; ++j) C[4 * i + j] = C[4 * i + j] * inv + c.hc_eps;
    }
    for (int it = 0; it < c.iters; ++it) {
        if (it > 0) {  // rows (the first iteration's row step is the softmax above)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float inv = 1.0f / (((C[4 * i] + C[4 * i + 1]) + C[4 * i + 2]) + C[4 * i + 3] + c.hc_eps);
#pragma unroll
                for (int j = 0; j < 4; ++j) C[4 * i + j] *= inv;
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // columns
            const float inv = 1.0f / (((C[j] + C[4 + j]) + C[8 + j]) + C[12 + j] + c.hc_eps);
#pragma unroll
            for (int i = 0; i < 4; ++i) C[4 * i + j] *= inv;
        }
    }
#pragma unroll
    for (int q = 0; q < 16; ++q) comb[q] = C[q];
}

// After the block's partial sums are in tot: with S > 1 slices per token group, publish them
// to part[(g * S + s) * N ..], count the slice in counters[g], and return false unless this
// block is the group's last; the last block sums the S partials in slice order (the same bits
// whichever block comes last), resets the counter for the next launch and returns true.
template <int TOK, int NT>
__device__ __forceinline__ bool hc_gather_slices(float* tot, float* __restrict__ part, int* __restrict__ counters,
                                                 long long g, int s, int S, int* s_last) {
    constexpr int N = DS4_HC_SLOT * TOK;
    if (S == 1) return true;
    float* mine = part + (g * S + s) * N;
    for (int i = threadIdx.x; i < N; i += NT) mine[i] = tot[i];
    __threadfence();  // this block's partials (and, in post_pre, its X_new) before the count
    __syncthreads();
    if (threadIdx.x == 0) *s_last = atomicAdd(counters + g, 1) == S - 1;
    __syncthreads();
    if (!*s_last) return false;
    __threadfence();
    for (int i = threadIdx.x; i < N; i += NT) {
        float a = 0.0f;
        for (int q = 0; q < S; ++q) a += __ldcg(part + (g * S + q) * N + i);
        tot[i] = a;
    }
    if (threadIdx.x == 0) counters[g] = 0;
    __syncthreads();
    return true;
}

// Finish of the block's tokens (thread t < TOK takes token t0 + t): post / comb written, pre
// left in s_pre[t][4] for the x_in pass.  Ends with __syncthreads().
template <int TOK>
__device__ __forceinline__ void hc_finish_tokens(const float* tot, const HcCoef& coef, long long t0, long long B,
                                                 float* __restrict__ post, float* __restrict__ comb,
                                                 float (*s_pre)[4]) {
    if (threadIdx.x < TOK && t0 + threadIdx.x < B) {
        const int t = threadIdx.x;
        const long long tok = t0 + t;
        float pr[4], po[4], cb[16];
        hc_finish(tot + t * DS4_HC_SLOT, coef, pr, po, cb);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            post[tok * 4 + h] = po[h];
            s_pre[t][h] = pr[h];
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) comb[tok * 16 + q] = cb[q];
    }
    __syncthreads();
}

// x_in[tok][d] = sum_h pre[h] * S[tok][h][d] (float32, rounded to bf16 once) for the block's
// tokens over the whole of D; S is X (pre) or X_new (post_pre), read with MODE.  Two chunks per
// thread per round keep 8 * TOK loads in flight.
template <int MODE, typename T, int V, int TOK, int NT>
__device__ __forceinline__ void hc_write_x_in(const T* src, long long s_ts, long long s_hs, long long t0, long long B,
                                              int D, const float (*s_pre)[4], __nv_bfloat16* __restrict__ x_in) {
    const int nc = D / V;
#pragma unroll 2
    for (int c = threadIdx.x; c < nc; c += NT) {
        const int d = c * V;
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            if (t0 + t >= B) break;
            const long long tok = t0 + t;
            float x[4][V];
#pragma unroll
            for (int h = 0; h < 4; ++h) hc_load<MODE, V>(src + tok * s_ts + h * s_hs + d, x[h]);
            float o[V];
#pragma unroll
            for (int e = 0; e < V; ++e) {
                float a = s_pre[t][0] * x[0][e];
                a = fmaf(s_pre[t][1], x[1][e], a);
                a = fmaf(s_pre[t][2], x[2][e], a);
                o[e] = fmaf(s_pre[t][3], x[3][e], a);
            }
            hc_store_round<V>(x_in + tok * D + d, o);
        }
    }
}
