// router_aux_scores_naive<T, VPL> — scores for the TE router's load-balancing (aux) loss; its
// backward is router_topk_backward_naive with DS4_MAP_ALL (backward.cu).
//
// Thread layout (one warp per token, DS4_DENSE_WARPS per block) and bytes: at the kernel.
#include "../common/common.cuh"
#include "../router/router_common.cuh"
#include "../router/rounds.cuh"
#include "te_common.cuh"

// router_aux_scores_naive<T, VPL>: scores for the load-balancing loss.  One warp per token, lane l
// holds experts l + 32 i: p = softmax(x) over E, or s / (sum_E s + 1e-20) for sigmoid /
// sqrtsoftplus; the routing map marks the top-k of p (k rounds of warp arg-max on order keys:
// larger first, lower index on ties); the intermediate is p (softmax), s (sigmoid) or x.
// Bytes: T*E*sizeof(T) read, T*E*(4 + 1 + 4) written.
template <typename T, int VPL>
__global__ void router_aux_scores_naive(const T* __restrict__ logits, long long num_tokens, int E, int k,
                                        int score_fn, float* __restrict__ scores, unsigned char* __restrict__ map,
                                        float* __restrict__ inter) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * DS4_DENSE_WARPS + (threadIdx.x >> 5);
    if (token >= num_tokens) return;
    const T* row = logits + token * (long long)E;
    const bool softmax = score_fn == DS4_SCORE_SOFTMAX;
    float x[VPL], mx, denom;
    ds4_load_row<T, VPL>(row, lane, E, softmax, x, mx, denom);
    float p[VPL];
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const bool in = lane + 32 * i < E;
        p[i] = !in ? 0.0f : softmax ? expf(x[i] - mx) / denom : ds4_score_fn(x[i], score_fn);
        part += p[i];
    }
    if (!softmax) {
        const float S = ds4_warp_sum(part) + 1e-20f;
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            const int e = lane + 32 * i;
            if (e < E) inter[token * (long long)E + e] = score_fn == DS4_SCORE_SIGMOID ? p[i] : x[i];
            p[i] = p[i] / S;
        }
    }
    unsigned key[VPL];
    unsigned sel = 0u;  // bit i: expert lane + 32 i is selected (VPL <= 32 here)
#pragma unroll
    for (int i = 0; i < VPL; ++i) key[i] = lane + 32 * i < E ? ds4_order_key(p[i]) : 0u;
    for (int r = 0; r < k; ++r) {
        int slot;
        ds4_select_round<VPL>(key, lane, 32, slot);
        if (slot >= 0) sel |= 1u << slot;
    }
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e >= E) continue;
        scores[token * (long long)E + e] = p[i];
        map[token * (long long)E + e] = (sel >> i) & 1u;
        if (softmax) inter[token * (long long)E + e] = p[i];
    }
}
