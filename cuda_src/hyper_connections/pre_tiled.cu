// hc_pre, tiled variant: the 24 dot products of every token as one tiled matrix product, for
// large B.  The other variants read hc_fn once per block of 1-4 tokens (96 D bytes of L2
// traffic per token group); here a block takes 256 tokens, so each hc_fn element it stages
// serves 256 tokens, and the product runs from shared memory with each thread holding a 4-token
// x 6-column tile of accumulators.  Two launches, because x_in needs every token's finished
// pre weights, i.e. the whole 4D-long reduction (a grid-wide dependency):
//
//   hc_pre_tiled_dots<T>: grid (token tiles of 256) x (KS slices of the 4D channels), 256
//     threads.  Per chunk of 32 channels (one stream, D % 32 == 0): the block stages X (256 tokens
//     x 32 channels, float, channel-major with a row of 257 so the transposing stores and the
//     reads are free of bank conflicts) and hc_fn's 24 rows (channel-major), the next chunk's
//     global loads already in flight; warp pair c (0-3) computes columns 6c .. 6c + 5 for
//     tokens q, q + 64, q + 128, q + 192 (q: the thread's place in the pair), pair 0 also the
//     sums of squares.  Each block writes its partial sums part[s][token][32] (24 dots, the sum
//     of squares, 7 unused).
//   hc_pre_tiled_finish<T, V>: one block of 128 threads per 4 tokens: adds the KS partials in
//     slice order (the same bits on every run), finishes each token (hc_finish: RMS factor,
//     sigmoids, Sinkhorn) and writes post, comb and x_in = sum_h pre[h] X[h] (hc_write_x_in).
//
// Bytes: X read twice (the dots, then x_in: from L2 when it still holds it), x_in written once,
// hc_fn read once per token tile, partials KS * B * 128 bytes written and read.
#include "hc_common.cuh"

#define DS4_HC_TILE_TOKENS 256
#define DS4_HC_TILE_CH 32
#define DS4_HC_TILE_THREADS 256
#define DS4_HC_TILE_ROW (DS4_HC_TILE_TOKENS + 1)  // floats per staged channel row of X

// Global loads of one chunk: 8 groups of 4 channels (lane & 7) x 4 tokens per warp (lane >> 3),
// 8 rounds of 32 tokens; 4 channels per load (V = 4 accesses: X aligned, D % 32 == 0).
template <typename T>
__device__ __forceinline__ void hc_tile_load(const T* __restrict__ X, long long x_ts, long long x_hs, long long t0,
                                             long long B, int h, int d, float (&v)[8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane & 7;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const long long t = t0 + r * 32 + warp * 4 + (lane >> 3);
        if (t < B) {
            hc_load<DS4_HC_LD_NC, 4>(X + t * x_ts + h * x_hs + d + 4 * g, v[r]);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[r][e] = 0.0f;
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(DS4_HC_TILE_THREADS)
hc_pre_tiled_dots(const T* __restrict__ X, long long x_ts, long long x_hs, long long B, int D,
                  const float* __restrict__ hc_fn, int KS, float* __restrict__ part) {
    __shared__ float xs[DS4_HC_TILE_CH * DS4_HC_TILE_ROW];
    __shared__ __align__(16) float ws[DS4_HC_TILE_CH * DS4_HC_MIX];
    const long long tile = blockIdx.x / KS;
    const int s = (int)(blockIdx.x % KS);
    const long long t0 = tile * DS4_HC_TILE_TOKENS;
    const int nch = 4 * D / DS4_HC_TILE_CH;  // chunks of the flattened 4D channels
    const int ch0 = (int)((long long)s * nch / KS), ch1 = (int)((long long)(s + 1) * nch / KS);
    const long long row = 4LL * D;          // hc_fn row length
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cg = warp >> 1;                // columns 6 cg .. 6 cg + 5
    const int q = (warp & 1) * 32 + lane;    // tokens q + 64 i

    float acc[4][6], sq[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        sq[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 6; ++j) acc[i][j] = 0.0f;
    }
    // this thread's share of a chunk: X (8 loads of 4 channels) and, threads < 192, 4 channels
    // of one hc_fn row (k = thread / 8); the next chunk's are loaded while one is multiplied
    const bool loads_w = threadIdx.x < DS4_HC_MIX * DS4_HC_TILE_CH / 4;
    const int wk = threadIdx.x >> 3, wc = 4 * (threadIdx.x & 7);
    float v[8][4], wv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (ch0 < ch1) {
        const int c = ch0 * DS4_HC_TILE_CH;
        hc_tile_load<T>(X, x_ts, x_hs, t0, B, c / D, c % D, v);
        if (loads_w) hc_load<DS4_HC_LD_NC, 4>(hc_fn + wk * row + c + wc, wv);
    }
    for (int ch = ch0; ch < ch1; ++ch) {
        const int c = ch * DS4_HC_TILE_CH;  // flattened channel of the chunk's first column
        // stage: X transposed (channel-major), hc_fn's 24 rows of the chunk (channel-major)
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int tt = r * 32 + warp * 4 + (lane >> 3), cc = 4 * (lane & 7);
#pragma unroll
            for (int e = 0; e < 4; ++e) xs[(cc + e) * DS4_HC_TILE_ROW + tt] = v[r][e];
        }
        if (loads_w) {
#pragma unroll
            for (int e = 0; e < 4; ++e) ws[(wc + e) * DS4_HC_MIX + wk] = wv[e];
        }
        __syncthreads();
        if (ch + 1 < ch1) {  // the next chunk's loads fly while this one is multiplied
            const int cn = c + DS4_HC_TILE_CH;
            hc_tile_load<T>(X, x_ts, x_hs, t0, B, cn / D, cn % D, v);
            if (loads_w) hc_load<DS4_HC_LD_NC, 4>(hc_fn + wk * row + cn + wc, wv);
        }
#pragma unroll 4
        for (int cc = 0; cc < DS4_HC_TILE_CH; ++cc) {
            const float* xr = xs + cc * DS4_HC_TILE_ROW + q;
            const float x0 = xr[0], x1 = xr[64], x2 = xr[128], x3 = xr[192];
            const float2* wr = reinterpret_cast<const float2*>(ws + cc * DS4_HC_MIX + 6 * cg);
            const float2 w01 = wr[0], w23 = wr[1], w45 = wr[2];
            const float w[6] = {w01.x, w01.y, w23.x, w23.y, w45.x, w45.y};
            const float x[4] = {x0, x1, x2, x3};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 6; ++j) acc[i][j] = fmaf(x[i], w[j], acc[i][j]);
            }
            if (cg == 0) {
#pragma unroll
                for (int i = 0; i < 4; ++i) sq[i] = fmaf(x[i], x[i], sq[i]);
            }
        }
        __syncthreads();  // xs / ws are restaged next
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long t = t0 + q + 64 * i;
        if (t >= B) continue;
        float* dst = part + ((long long)s * B + t) * DS4_HC_SLOT;
#pragma unroll
        for (int j = 0; j < 6; ++j) dst[6 * cg + j] = acc[i][j];
        if (cg == 0) dst[DS4_HC_MIX] = sq[i];
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(128)
hc_pre_tiled_finish(const T* __restrict__ X, long long x_ts, long long x_hs, long long B, int D,
                    const float* __restrict__ scale_ptr, float s0, float s1, float s2,
                    const float* __restrict__ hc_base, float norm_eps, float hc_eps, int iters, int KS,
                    const float* __restrict__ part, __nv_bfloat16* __restrict__ x_in, float* __restrict__ post,
                    float* __restrict__ comb) {
    __shared__ float tot[4 * DS4_HC_SLOT];
    __shared__ float s_pre[4][4];
    const long long t0 = (long long)blockIdx.x * 4;
    {
        const int t = threadIdx.x >> 5, k = threadIdx.x & 31;  // 128 threads: 4 tokens x 32 values
        float a = 0.0f;
        if (t0 + t < B && k <= DS4_HC_MIX) {
            for (int s = 0; s < KS; ++s) a += part[((long long)s * B + t0 + t) * DS4_HC_SLOT + k];
        }
        tot[threadIdx.x] = a;
    }
    __syncthreads();
    const HcCoef coef{scale_ptr, s0, s1, s2, hc_base, norm_eps, hc_eps, iters, 4.0f * (float)D};
    hc_finish_tokens<4>(tot, coef, t0, B, post, comb, s_pre);
    hc_write_x_in<DS4_HC_LD_NC, T, V, 4, 128>(X, x_ts, x_hs, t0, B, D, s_pre, x_in);
}
