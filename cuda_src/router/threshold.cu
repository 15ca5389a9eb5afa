// router_topk_threshold<T, VPL> — router top-k (compact form), the naive kernel's answer with
// less work per token.
//
// One warp per token, lane l holding experts l, l+32, ... (as router_topk_naive).  Each lane takes
// the max of its keys; the k-th largest lane max (k rounds over 32 values, not over E) is a
// threshold that at least k experts reach, so every top-k expert is at or above it.  The few
// experts at or above it (usually k + a few) are compacted one per lane and selected exactly.
// For sqrtsoftplus the screening scores use the fast approximation of router_common.cuh
// (ds4_sqrtsoftplus_approx) and the threshold is lowered by twice its error bound, so the screen
// never drops a top-k expert; candidates are then scored with the precise functions.  More than
// 32 candidates (heavy ties, NaN rows, k > 32) fall back to the naive rounds: the result is
// identical.  No group-limited routing.
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias, cached), T*k*(4 + sizeof(index)) written.
// Needs sm_80+ for the warp-reduce instructions.
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rounds.cuh"

template <typename T, int VPL>
__global__ void router_topk_threshold(const T* __restrict__ logits,
                                      const float* __restrict__ bias,  // [E] or nullptr
                                      long long num_tokens, int E, int k,
                                      int score_fn, int pre_softmax, float scaling,
                                      float* __restrict__ weights, long long w_rs, long long w_cs,
                                      void* __restrict__ indices, long long i_rs, long long i_cs,
                                      int idx_kind) {
    __shared__ int cand_e[32 * 4];  // blockDim.x <= 128: one 32-slot list per warp
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long token = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (token >= num_tokens) return;
    const T* row = logits + token * (long long)E;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    float x[VPL], mx, denom;
    ds4_load_row<T, VPL>(row, lane, E, pre, x, mx, denom);
    float* wrow = weights + token * w_rs;
    const long long irow = token * i_rs;
    const bool approx = score_fn == DS4_SCORE_SQRTSOFTPLUS;

    // 1. screening keys and this lane's max
    unsigned key[VPL];
    unsigned lmax = 0u;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        float a;
        if (approx) {
            a = ds4_sqrtsoftplus_approx(x[i]);
            if (bias != nullptr && e < E) a += bias[e];
        } else {
            a = ds4_sel_score(x[i], e, score_fn, pre, mx, denom, e < E ? bias : nullptr);
        }
        key[i] = e < E ? ds4_order_key(a) : 0u;
        lmax = max(lmax, key[i]);
    }
    // 2. theta = k-th largest lane max (each lane counted once; lowest lane first on ties)
    unsigned theta = 0u;
    if (k <= 32) {
        unsigned m = lmax;
        for (int r = 0; r < k; ++r) {
            theta = __reduce_max_sync(0xffffffffu, m);
            const unsigned l = __reduce_min_sync(0xffffffffu, m == theta ? (unsigned)lane : 32u);
            if ((unsigned)lane == l) m = 0u;
        }
    }
    // 3. candidates: keys at or above theta lowered by the screening error bound
    unsigned lo = theta;
    if (approx && theta >= 2u) {
        const float th = ds4_key_to_float(theta);
        lo = ds4_order_key(th - 2.0f * ds4_screen_err<DS4_SF_SQRTSOFTPLUS>(fabsf(th)));
        lo = max(lo, 2u);  // never admit NaN screening keys
    }
    unsigned mask = 0u;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (key[i] >= lo && key[i] != 0u) mask |= 1u << i;
    const int cnt = __popc(mask);
    const int total = (int)__reduce_add_sync(0xffffffffu, (unsigned)cnt);
    if (theta < 2u || total > 32) {  // NaN/degenerate rows, heavy ties, k > 32
        ds4_topk_rounds<T, VPL>(row, bias, x, lane, E, k, score_fn, pre, mx, denom, scaling,
                                wrow, w_cs, indices, irow, i_cs, idx_kind, 0, 0);
        return;
    }
    // 4. compact the candidates, one per lane
    int incl = cnt;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
    }
    int pos = incl - cnt;
    int* list = cand_e + 32 * warp;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (mask & (1u << i)) list[pos++] = lane + 32 * i;
    __syncwarp();
    const bool has = lane < total;
    const int ce = has ? list[lane] : 0;
    __syncwarp();
    // 5. exact scores of the candidates, exact selection among them
    float cx = 0.0f, csel = 0.0f;
    if (has) {
        cx = ds4_to_float(row[ce]);
        csel = ds4_sel_score(cx, ce, score_fn, pre, mx, denom, bias);
    }
    unsigned ck = has ? ds4_order_key(csel) : 0u;
    int my_round = -1;
    float x0 = 0.0f;
    for (int r = 0; r < k; ++r) {
        const unsigned wk = __reduce_max_sync(0xffffffffu, ck);
        const unsigned we = __reduce_min_sync(0xffffffffu, ck == wk ? (unsigned)ce : 0xffffffffu);
        if (r == 0) x0 = ds4_to_float(row[we]);
        if (has && ck == wk && (unsigned)ce == we) { my_round = r; ck = 0u; }
    }
    // 6. weights, written by the lane that holds each winner
    const bool sel = my_round >= 0;
    float v = 0.0f;
    if (sel) {
        if (score_fn == DS4_SCORE_SOFTMAX) v = pre ? csel : expf(cx - x0);
        else v = bias != nullptr ? ds4_score_fn(cx, score_fn) : csel;
    }
    float w;
    if (pre) {
        w = v * scaling;
    } else {
        const float tot = ds4_warp_sum(v);
        const bool norm = score_fn == DS4_SCORE_SOFTMAX || k > 1;
        const float dn = score_fn == DS4_SCORE_SOFTMAX ? tot : tot + 1e-20f;
        w = (norm ? v / dn : v) * scaling;
    }
    if (sel) {
        wrow[my_round * w_cs] = w;
        ds4_store_index(indices, idx_kind, irow + my_round * i_cs, ce);
    }
}
