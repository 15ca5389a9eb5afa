// The naive selection, shared by the compact router's naive, threshold (fallback) and radix
// (weights) kernels and the TE dense / aux forms: one warp per token, lane l holding experts
// l, l+32, ... in registers; k rounds of warp arg-max over order keys (larger score first, lower
// index on ties), optional group-limited routing, then the weights from the winners' logits.
#pragma once
#include "router_common.cuh"

// Group-limited routing: group score = sum of the group's top m = k / group_topk selection
// scores (added in descending order, as the reference does); the top group_topk groups stay,
// every other expert's key becomes that of -inf.  Lane g holds group g's score (num_groups <= 32),
// and a per-lane bit mask remembers which slots a group already counted (VPL <= 32).
template <int VPL>
__device__ __forceinline__ void ds4_group_mask(unsigned (&key)[VPL], int lane, int E, int k,
                                               int num_groups, int group_topk) {
    if constexpr (VPL <= 32) {
        const int gs = E / num_groups, m = k / group_topk;
        float gscore = 0.0f;
        for (int g = 0; g < num_groups; ++g) {
            const float sum = ds4_group_score<VPL>(
                key, m, [&](int i) { const int e = lane + 32 * i; return e >= g * gs && e < (g + 1) * gs; },
                [&](int i) { return lane + 32 * i; },
                [](unsigned& bk, int& be) {  // the whole warp
                    const unsigned wk = __reduce_max_sync(0xffffffffu, bk);
                    be = (int)__reduce_min_sync(0xffffffffu, bk == wk ? (unsigned)be : 0xffffffffu);
                    bk = wk;
                });
            if (lane == g) gscore = sum;
        }
        const unsigned gk = lane < num_groups ? ds4_order_key(gscore) : 0u;
        const int rank = ds4_group_rank(gk, lane, 1, num_groups);
        const unsigned kept = __ballot_sync(0xffffffffu, lane < num_groups && rank < group_topk);
        const unsigned masked = ds4_order_key(DS4_NEG_INF);
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
            const int e = lane + 32 * i;
            if (e < E && !((kept >> (e / gs)) & 1u)) key[i] = masked;
        }
    }
}

// Weights of one token's k winners in output order (lane l writes outputs l, l+32, ...): the
// score of each winner's logit (softmax: e^(x - x_first), or p for pre-softmax), normalised over
// the k winners where the spec says so, times `scaling`.  Output j's expert is `mine` when
// `in_reg` (k <= 32, this lane holds winner j), else read back from the index output.
template <typename T>
__device__ __forceinline__ void ds4_write_weights(const T* __restrict__ row, int first, int lane, int k, int score_fn,
                                                  bool pre, float mx, float denom, float scaling, float* wrow,
                                                  long long w_cs, const void* indices, int idx_kind, long long irow,
                                                  long long i_cs, bool in_reg, int mine) {
    const float x0 = ds4_to_float(row[first]);
    float part = 0.0f;
    for (int j = lane; j < k; j += 32) {
        const int e = in_reg ? mine : ds4_load_index(indices, idx_kind, irow + j * i_cs);
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

// The k rounds over all experts, then the weights: the naive algorithm, also the fallback of
// the threshold kernel.  x[] holds this lane's logits (experts lane + 32 i).
template <typename T, int VPL>
__device__ __forceinline__ void ds4_topk_rounds(const T* __restrict__ row, const float* __restrict__ bias,
                                                const float (&x)[VPL], int lane, int E, int k, int score_fn,
                                                bool pre, float mx, float denom, float scaling,
                                                float* __restrict__ wrow, long long w_cs,
                                                void* __restrict__ indices, long long irow, long long i_cs,
                                                int idx_kind, int num_groups, int group_topk) {
    unsigned key[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        key[i] = e < E ? ds4_order_key(ds4_sel_score(x[i], e, score_fn, pre, mx, denom, bias)) : 0u;
    }
    if (num_groups > 0) ds4_group_mask<VPL>(key, lane, E, k, num_groups, group_topk);
    int mine = 0;   // expert chosen in round (chunk*32 + lane)
    int first = 0;  // expert chosen in round 0 (the largest score)
    for (int r = 0; r < k; ++r) {
        int slot;
        const int e = ds4_select_round<VPL>(key, lane, 32, slot);
        if (r == 0) first = e;
        if ((r & 31) == lane) mine = e;
        if ((r & 31) == 31 || r == k - 1) {
            const int j = (r & ~31) + lane;
            if (j <= r) ds4_store_index(indices, idx_kind, irow + j * i_cs, mine);
        }
    }
    // Weights.  For k <= 32 the index is still in `mine`, otherwise it is read back from this
    // lane's own earlier store.
    ds4_write_weights<T>(row, first, lane, k, score_fn, pre, mx, denom, scaling, wrow, w_cs, indices, idx_kind,
                         irow, i_cs, k <= 32, mine);
}

// Loads this lane's logits and, for pre-softmax, the row's max and denominator.
template <typename T, int VPL>
__device__ __forceinline__ void ds4_load_row(const T* __restrict__ row, int lane, int E, bool pre,
                                             float (&x)[VPL], float& mx, float& denom) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        x[i] = e < E ? ds4_to_float(row[e]) : DS4_NEG_INF;
    }
    mx = 0.0f;
    denom = 1.0f;
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
}
