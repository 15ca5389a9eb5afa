// hc_post<T, Y, V> — manifold-constrained hyper-connections, after a sub-block:
// X_new[j] = post[j] * y + sum_i comb[i, j] * X[i] per token (float32 arithmetic, stored in X's
// dtype T; y is the sub-block output in Y).  Pure streaming, no reduction.
//
// Thread layout: DS4_HC_POST_THREADS threads per block, blocks over (token, run of
// DS4_HC_POST_THREADS chunks of V channels); a thread reads the four streams and y at its
// chunk and writes the four new streams.  X_new may be X itself (in place): a thread reads its
// elements before writing the same ones, and no other thread touches them.
//
// Bytes per token: X read and X_new written once (4 D sizeof(T) each), y read once
// (D sizeof(Y)), post and comb read once per block (80, from L1 / L2 after the first).
#include "hc_common.cuh"

template <typename T, typename Y, int V>
__global__ void __launch_bounds__(DS4_HC_POST_THREADS)
hc_post(const Y* __restrict__ y, long long y_ts, const T* X, long long x_ts, long long x_hs,
        const float* __restrict__ post, const float* __restrict__ comb, T* X_new, long long n_ts, long long n_hs,
        long long B, int D, int blocks_per_token) {
    static_assert(V == 1 || V == 4, "scalar or 4-channel accesses");
    const long long tok = blockIdx.x / blocks_per_token;
    const int c = (int)(blockIdx.x % blocks_per_token) * DS4_HC_POST_THREADS + threadIdx.x;
    if (tok >= B || c >= D / V) return;
    const int d = c * V;
    float x[4][V], yv[V];
#pragma unroll
    for (int i = 0; i < DS4_HC_STREAMS; ++i) hc_load<DS4_HC_LD_PLAIN, V>(X + tok * x_ts + i * x_hs + d, x[i]);
    hc_load<DS4_HC_LD_NC, V>(y + tok * y_ts + d, yv);
    float p[4], cm[16];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = __ldg(post + tok * 4 + j);
#pragma unroll
    for (int q = 0; q < 16; ++q) cm[q] = __ldg(comb + tok * 16 + q);
#pragma unroll
    for (int j = 0; j < DS4_HC_STREAMS; ++j) {
        float o[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
            float a = p[j] * yv[e];
#pragma unroll
            for (int i = 0; i < DS4_HC_STREAMS; ++i) a = fmaf(cm[4 * i + j], x[i][e], a);
            o[e] = a;
        }
        hc_store_round<V>(X_new + tok * n_ts + j * n_hs + d, o);
    }
}
