// hc_pre<T, V, TOK, NT> — manifold-constrained hyper-connections, before a sub-block: per token,
// the 24 dot products of its flattened streams X[4, D] with hc_fn [24, 4D], the RMS factor, the
// sigmoids, the row softmax and Sinkhorn iterations of the 4x4 comb, and x_in = sum_h pre[h] X[h]
// (bf16).  One launch.
//
// Thread layout: blocks of NT threads over (token group of TOK tokens, slice s of S).  A block
// takes chunks [s * nc / S, (s + 1) * nc / S) of its tokens' nc = D / V chunks of V channels,
// all four streams of each, and accumulates 24 dot products and the sum of squares per token
// (every hc_fn element it loads serves its TOK tokens).  S = 1 (variants naive: TOK = 1, and
// grouped): the block reduces, finishes and writes x_in itself.  S > 1 (variant split): blocks
// publish their partial sums and the last block of the group (atomic counter) adds them in slice
// order, finishes and writes x_in for the group over the whole of D (X re-read, mostly from L2).
//
// Bytes per token: X read once (4 D sizeof(T)), and again from L2 for x_in; x_in written
// (2 D); post and comb written (80).  hc_fn (96 D bytes) is read once per block: from L2 after
// the first blocks, so L2 traffic is 96 D / TOK bytes per token.  Split adds S * 128 * TOK bytes
// of partial sums per token group.
#include "hc_common.cuh"

template <typename T, int V, int TOK, int NT>
__global__ void __launch_bounds__(NT)
hc_pre(const T* __restrict__ X, long long x_ts, long long x_hs, long long B, int D,
       const float* __restrict__ hc_fn, const float* __restrict__ scale_ptr, float s0, float s1, float s2,
       const float* __restrict__ hc_base, float norm_eps, float hc_eps, int iters, int S,
       float* __restrict__ part, int* __restrict__ counters,
       __nv_bfloat16* __restrict__ x_in, float* __restrict__ post, float* __restrict__ comb) {
    static_assert(V == 1 || V == 4, "scalar or 4-channel accesses");
    static_assert(NT % 32 == 0, "whole warps");
    constexpr int N = DS4_HC_SLOT * TOK;
    __shared__ float red[(NT / 32) * N];
    __shared__ float tot[N];
    __shared__ float s_pre[TOK][4];
    __shared__ int s_last;

    const long long g = blockIdx.x / S;
    const int s = (int)(blockIdx.x % S);
    const long long t0 = g * TOK;
    const int nc = D / V;
    const int c0 = (int)((long long)s * nc / S), c1 = (int)((long long)(s + 1) * nc / S);
    const long long row = 4LL * D;  // hc_fn row length

    float acc[TOK][DS4_HC_MIX + 1];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int k = 0; k <= DS4_HC_MIX; ++k) acc[t][k] = 0.0f;
    }
    for (int c = c0 + threadIdx.x; c < c1; c += NT) {
        const int d = c * V;
#pragma unroll
        for (int h = 0; h < DS4_HC_STREAMS; ++h) {
            float x[TOK][V];
#pragma unroll
            for (int t = 0; t < TOK; ++t) {
                if (t0 + t < B) {
                    hc_load<DS4_HC_LD_NC, V>(X + (t0 + t) * x_ts + h * x_hs + d, x[t]);
                } else {
#pragma unroll
                    for (int e = 0; e < V; ++e) x[t][e] = 0.0f;
                }
#pragma unroll
                for (int e = 0; e < V; ++e) acc[t][DS4_HC_MIX] = fmaf(x[t][e], x[t][e], acc[t][DS4_HC_MIX]);
            }
            const float* f = hc_fn + (long long)h * D + d;
#pragma unroll
            for (int k = 0; k < DS4_HC_MIX; ++k) {
                float w[V];
                hc_load<DS4_HC_LD_NC, V>(f + k * row, w);
#pragma unroll
                for (int t = 0; t < TOK; ++t) {
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[t][k] = fmaf(x[t][e], w[e], acc[t][k]);
                }
            }
        }
    }
    hc_block_reduce<TOK, NT>(acc, red, tot);
    if (!hc_gather_slices<TOK, NT>(tot, part, counters, g, s, S, &s_last)) return;
    const HcCoef coef{scale_ptr, s0, s1, s2, hc_base, norm_eps, hc_eps, iters, (float)row};
    hc_finish_tokens<TOK>(tot, coef, t0, B, post, comb, s_pre);
    hc_write_x_in<DS4_HC_LD_NC, T, V, TOK, NT>(X, x_ts, x_hs, t0, B, D, s_pre, x_in);
}
