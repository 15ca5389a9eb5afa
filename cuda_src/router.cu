// router.cu — DeepSeek-V4 router top-k (compact form): weights [T, k] float32, indices [T, k].
//
// router_topk_naive<T, VPL>: one warp per token.  Lane l holds experts l, l+32, ...
// (VPL = values per lane, a compile-time bound with 32*VPL >= E) as 32-bit order keys in
// registers.  k rounds: each lane takes its best key, the warp takes the max key
// (__reduce_max_sync) and then the lowest expert index holding it (__reduce_min_sync): larger
// score first, lower index on ties.  The owner clears the winner's key.  Weights are computed
// after selection from the logits of the chosen experts (a cached re-read of k values), so the
// unbiased score and the normalisation need no extra registers.
//
// Outputs may be strided views (row and column strides in elements), and the index type is a
// run-time switch (uint8/uint16/int16/int32/int64) so a routing-capture buffer of a narrow dtype
// is filled in place with no extra kernel.
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias, cached), T*k*(4 + sizeof(index)) written.
// Needs sm_80+ for the warp-reduce instructions.
#include "common.cuh"

#include "router_common.cuh"

template <typename T, int VPL>
__global__ void router_topk_naive(const T* __restrict__ logits,
                                  const float* __restrict__ bias,  // [E] or nullptr
                                  long long num_tokens, int E, int k,
                                  int score_fn, int pre_softmax, float scaling,
                                  float* __restrict__ weights, long long w_rs, long long w_cs,
                                  void* __restrict__ indices, long long i_rs, long long i_cs,
                                  int idx_kind) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (token >= num_tokens) return;  // whole warps leave together
    const T* row = logits + token * (long long)E;

    float x[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        x[i] = e < E ? ds4_to_float(row[e]) : DS4_NEG_INF;
    }

    // Full softmax statistics (pre-softmax only).
    float mx = 0.0f, denom = 1.0f;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    if (pre) {
        mx = DS4_NEG_INF;
#pragma unroll
        for (int i = 0; i < VPL; ++i) mx = fmaxf(mx, x[i]);
        mx = ds4_warp_max(mx);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (lane + 32 * i < E) s += expf(x[i] - mx);
        denom = ds4_warp_sum(s);
    }

    unsigned key[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        float sel;
        if (score_fn == DS4_SCORE_SOFTMAX) {
            sel = pre ? expf(x[i] - mx) / denom : x[i];
        } else {
            sel = ds4_score_fn(x[i], score_fn);
            if (bias != nullptr && e < E) sel += bias[e];
        }
        key[i] = e < E ? ds4_order_key(sel) : 0u;
    }

    const long long irow = token * i_rs;  // element offsets of this token's outputs
    float* wrow = weights + token * w_rs;
    int mine = 0;   // expert chosen in round (chunk*32 + lane)
    int first = 0;  // expert chosen in round 0 (the largest score)
    for (int r = 0; r < k; ++r) {
        unsigned bk = 0u;
        int be = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (key[i] > bk) { bk = key[i]; be = lane + 32 * i; }
        const unsigned wk = __reduce_max_sync(0xffffffffu, bk);
        const int e = (int)__reduce_min_sync(0xffffffffu, bk == wk ? (unsigned)be : 0xffffffffu);
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (lane + 32 * i == e) key[i] = 0u;
        if (r == 0) first = e;
        if ((r & 31) == lane) mine = e;
        if ((r & 31) == 31 || r == k - 1) {
            const int j = (r & ~31) + lane;
            if (j <= r) ds4_store_index(indices, idx_kind, irow + j * i_cs, mine);
        }
    }

    // Weights.  Lane l handles outputs l, l+32, ...; for k <= 32 the index is still in `mine`,
    // otherwise it is read back from this lane's own earlier store.
    const float x0 = ds4_to_float(row[first]);
    float part = 0.0f;
    for (int j = lane; j < k; j += 32) {
        const int e = k <= 32 ? mine : ds4_load_index(indices, idx_kind, irow + j * i_cs);
        const float xe = ds4_to_float(row[e]);
        float v;
        if (score_fn == DS4_SCORE_SOFTMAX) v = pre ? expf(xe - mx) / denom : expf(xe - x0);
        else v = ds4_score_fn(xe, score_fn);
        part += v;
        wrow[j * w_cs] = v;  // provisional, normalised below by the same lane
    }
    if (pre) {
        for (int j = lane; j < k; j += 32) wrow[j * w_cs] *= scaling;
        return;
    }
    const float total = ds4_warp_sum(part);
    const bool norm = score_fn == DS4_SCORE_SOFTMAX || k > 1;
    const float dn = score_fn == DS4_SCORE_SOFTMAX ? total : total + 1e-20f;
    for (int j = lane; j < k; j += 32) {
        const float v = wrow[j * w_cs];
        wrow[j * w_cs] = (norm ? v / dn : v) * scaling;
    }
}
