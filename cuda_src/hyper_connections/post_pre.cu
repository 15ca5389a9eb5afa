// hc_post_pre<T, Y, V, TOK, NT> — the boundary between two sub-blocks in one launch: hc_post of
// the one that ran (X_new[j] = post[j] * y + sum_i comb[i, j] * X[i], stored in T) and hc_pre of
// the next on X_new as stored (its own hc_fn / hc_scale / hc_base): post_out, comb_out and x_in.
//
// Thread layout: as pre.cu.  Blocks of NT threads over (token group of TOK tokens, slice s of S);
// at each chunk a thread reads X's four streams and y for its tokens, writes X_new, rounds it to
// T, and accumulates the next block's 24 dot products and sum of squares from those rounded
// values while they are in registers (each hc_fn element loaded serves TOK tokens).  S = 1:
// the block reduces, finishes and writes x_in from X_new (its own writes, read back through L2).
// S > 1 (split): the last block of the group (atomic counter, after every block's X_new and
// partial sums are fenced) adds the partial sums, finishes, and writes x_in over the whole of D.
// X_new may be X itself (in place): each element is read by the thread that then overwrites it.
//
// Bytes per token: X read once and X_new written once (4 D sizeof(T) each), X_new read back
// from L2 for x_in, y read once (D sizeof(Y)), x_in written (2 D), post / comb read and written
// (160).  hc_fn: 96 D bytes per block, from L2 after the first blocks.
#include "hc_common.cuh"

template <typename T, typename Y, int V, int TOK, int NT>
__global__ void __launch_bounds__(NT)
hc_post_pre(const Y* __restrict__ y, long long y_ts, const T* X, long long x_ts, long long x_hs,
            const float* __restrict__ post_in, const float* __restrict__ comb_in,
            T* X_new, long long n_ts, long long n_hs, long long B, int D,
            const float* __restrict__ hc_fn, const float* __restrict__ scale_ptr, float s0, float s1, float s2,
            const float* __restrict__ hc_base, float norm_eps, float hc_eps, int iters, int S,
            float* __restrict__ part, int* __restrict__ counters,
            __nv_bfloat16* __restrict__ x_in, float* __restrict__ post, float* __restrict__ comb) {
    static_assert(V == 1 || V == 4, "scalar or 4-channel accesses");
    static_assert(NT % 32 == 0, "whole warps");
    constexpr int N = DS4_HC_SLOT * TOK;
    __shared__ float red[(NT / 32) * N];
    __shared__ float tot[N];
    __shared__ float s_pc[TOK][20];  // post_in (4) and comb_in (16) of the block's tokens
    __shared__ float s_pre[TOK][4];
    __shared__ float s_xn[DS4_HC_STREAMS * TOK * V * NT];  // per thread: its chunk's X_new
    __shared__ int s_last;

    const long long g = blockIdx.x / S;
    const int s = (int)(blockIdx.x % S);
    const long long t0 = g * TOK;
    const int nc = D / V;
    const int c0 = (int)((long long)s * nc / S), c1 = (int)((long long)(s + 1) * nc / S);
    const long long row = 4LL * D;

    for (int i = threadIdx.x; i < TOK * 20; i += NT) {
        const int t = i / 20, j = i % 20;
        float v = 0.0f;
        if (t0 + t < B) v = j < 4 ? post_in[(t0 + t) * 4 + j] : comb_in[(t0 + t) * 16 + (j - 4)];
        s_pc[t][j] = v;
    }
    __syncthreads();

    float acc[TOK][DS4_HC_MIX + 1];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int k = 0; k <= DS4_HC_MIX; ++k) acc[t][k] = 0.0f;
    }
    for (int c = c0 + threadIdx.x; c < c1; c += NT) {
        const int d = c * V;
        // Every load of this chunk comes before any store (X may be X_new).  The loaded streams
        // wait in this thread's column of s_xn, where X_new (rounded to T, as stored) then
        // replaces them for the dot products: held in registers, TOK = 4 would exceed 255.
        float yv[TOK][V];
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
#pragma unroll
            for (int i = 0; i < DS4_HC_STREAMS; ++i) {
                float xi[V];
                if (t0 + t < B) {
                    hc_load<DS4_HC_LD_PLAIN, V>(X + (t0 + t) * x_ts + i * x_hs + d, xi);
                } else {
#pragma unroll
                    for (int e = 0; e < V; ++e) xi[e] = 0.0f;
                }
#pragma unroll
                for (int e = 0; e < V; ++e) s_xn[((i * TOK + t) * V + e) * NT + threadIdx.x] = xi[e];
            }
            if (t0 + t < B) {
                hc_load<DS4_HC_LD_NC, V>(y + (t0 + t) * y_ts + d, yv[t]);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) yv[t][e] = 0.0f;
            }
            if constexpr (TOK == 4) {  // two tokens' loads in flight at a time
                if (t == 1) asm volatile("" ::: "memory");
            }
        }
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            float x[4][V];
#pragma unroll
            for (int i = 0; i < DS4_HC_STREAMS; ++i) {
#pragma unroll
                for (int e = 0; e < V; ++e) x[i][e] = s_xn[((i * TOK + t) * V + e) * NT + threadIdx.x];
            }
#pragma unroll
            for (int j = 0; j < DS4_HC_STREAMS; ++j) {
                float xn[V];
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    float a = s_pc[t][j] * yv[t][e];
#pragma unroll
                    for (int i = 0; i < DS4_HC_STREAMS; ++i) a = fmaf(s_pc[t][4 + 4 * i + j], x[i][e], a);
                    xn[e] = a;
                }
                if (t0 + t < B) hc_store_round<V>(X_new + (t0 + t) * n_ts + j * n_hs + d, xn);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    s_xn[((j * TOK + t) * V + e) * NT + threadIdx.x] = xn[e];
                    acc[t][DS4_HC_MIX] = fmaf(xn[e], xn[e], acc[t][DS4_HC_MIX]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < DS4_HC_STREAMS; ++j) {
            float xn[TOK][V];
#pragma unroll
            for (int t = 0; t < TOK; ++t) {
#pragma unroll
                for (int e = 0; e < V; ++e) xn[t][e] = s_xn[((j * TOK + t) * V + e) * NT + threadIdx.x];
            }
            const float* f = hc_fn + (long long)j * D + d;
#pragma unroll
            for (int k = 0; k < DS4_HC_MIX; ++k) {
                float w[V];
                hc_load<DS4_HC_LD_NC, V>(f + k * row, w);
#pragma unroll
                for (int t = 0; t < TOK; ++t) {
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[t][k] = fmaf(xn[t][e], w[e], acc[t][k]);
                }
            }
        }
    }
    __threadfence();  // X_new stores reach L2 before any block's x_in pass reads them back (ld.cg)
    hc_block_reduce<TOK, NT>(acc, red, tot);
    if (!hc_gather_slices<TOK, NT>(tot, part, counters, g, s, S, &s_last)) return;
    const HcCoef coef{scale_ptr, s0, s1, s2, hc_base, norm_eps, hc_eps, iters, (float)row};
    hc_finish_tokens<TOK>(tot, coef, t0, B, post, comb, s_pre);
    hc_write_x_in<DS4_HC_LD_CG, T, V, TOK, NT>(X_new, n_ts, n_hs, t0, B, D, s_pre, x_in);
}
