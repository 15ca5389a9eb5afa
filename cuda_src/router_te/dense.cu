// router_topk_dense_naive<T, VPL> — TE's dense form of the router top-k in one launch.
//
// One warp per token (DS4_DENSE_WARPS per block): the naive selection (as router_topk_naive)
// writes the compact weights to a float32 [T, k] scratch and the indices to the caller's dense
// index buffer (int16/32/64) or an int32 [T, k] scratch; then the warp writes the dense rows:
// probs (0 except the selected weights), the float32 intermediate for backward (softmax pre: the
// full softmax; post: -inf except the softmax over the selected; sigmoid: s; sqrtsoftplus: the
// logits) and the routing map (bytemap or LSB-first bitmap; none with dense indices).  Owner lanes
// fill each dense row, __syncwarp orders those stores before the k selected entries are scattered
// over them.
//
// Bytes: T*E*sizeof(T) read; T*E*(sizeof(T) + 4 + map) written (+ T*k*8 scratch, cached).
#include "../common/common.cuh"
#include "../router/router_common.cuh"
#include "../router/rounds.cuh"
#include "te_common.cuh"

template <typename T, int VPL>
__global__ void router_topk_dense_naive(const T* __restrict__ logits, const float* __restrict__ bias,
                                        long long num_tokens, int E, int k, int score_fn, int pre_softmax,
                                        float scaling, float* __restrict__ cw, void* __restrict__ indices,
                                        int idx_kind, long long i_rs, long long i_cs, T* __restrict__ probs, float* __restrict__ inter,
                                        unsigned char* __restrict__ map, int map_kind, int num_groups,
                                        int group_topk) {
    __shared__ unsigned bits[DS4_DENSE_WARPS][DS4_BITMAP_WORDS];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const long long token = (long long)blockIdx.x * DS4_DENSE_WARPS + wib;
    if (token >= num_tokens) return;  // whole warps leave together
    const T* row = logits + token * (long long)E;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    float x[VPL], mx, denom;
    ds4_load_row<T, VPL>(row, lane, E, pre, x, mx, denom);
    float* wrow = cw + token * (long long)k;
    ds4_topk_rounds<T, VPL>(row, bias, x, lane, E, k, score_fn, pre, mx, denom, scaling, wrow, 1, indices,
                            token * i_rs, i_cs, idx_kind, num_groups, group_topk);
    T* prow = probs + token * (long long)E;
    float* irow = inter + token * (long long)E;
    const int nb = (E + 7) >> 3;
    unsigned char* mrow = map + token * (long long)(map_kind == DS4_MAP_BITS ? nb : E);
    // (the logits are re-read from cache: keeping x[] alive through the rounds costs registers)
    for (int e = lane; e < E; e += 32) {
        prow[e] = ds4_from_float<T>(0.0f);
        const float xe = ds4_to_float(row[e]);
        float v;
        if (score_fn == DS4_SCORE_SOFTMAX) v = pre ? expf(xe - mx) / denom : DS4_NEG_INF;
        else v = score_fn == DS4_SCORE_SIGMOID ? ds4_score_fn(xe, DS4_SCORE_SIGMOID) : xe;
        irow[e] = v;
        if (map_kind == DS4_MAP_BYTES) mrow[e] = 0;
    }
    if (map_kind == DS4_MAP_BITS)
        for (int w = lane; w < DS4_BITMAP_WORDS; w += 32) bits[wib][w] = 0u;
    __syncwarp();  // the compact outputs of every lane and the fills above, before the scatter
    const bool post = score_fn == DS4_SCORE_SOFTMAX && !pre;
    const float x0 = post ? ds4_to_float(row[ds4_load_index(indices, idx_kind, token * i_rs)]) : 0.0f;
    float part = 0.0f;
    for (int j = lane; j < k; j += 32) {
        const int e = ds4_load_index(indices, idx_kind, token * i_rs + j * i_cs);
        prow[e] = ds4_from_float<T>(wrow[j]);
        if (map_kind == DS4_MAP_BYTES) mrow[e] = 1;
        if (map_kind == DS4_MAP_BITS) atomicOr(&bits[wib][e >> 5], 1u << (e & 31));
        if (post) part += expf(ds4_to_float(row[e]) - x0);
    }
    if (post) {
        const float total = ds4_warp_sum(part);
        for (int j = lane; j < k; j += 32) {
            const int e = ds4_load_index(indices, idx_kind, token * i_rs + j * i_cs);
            irow[e] = expf(ds4_to_float(row[e]) - x0) / total;
        }
    }
    if (map_kind == DS4_MAP_BITS) {
        __syncwarp();
        for (int b = lane; b < nb; b += 32) mrow[b] = (unsigned char)(bits[wib][b >> 2] >> (8 * (b & 3)));
    }
}
