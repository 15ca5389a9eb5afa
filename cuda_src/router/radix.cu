// router_topk_radix<T> — router top-k (compact form: weights [T, k] float32, indices [T, k])
// for large E or large k.
//
// One warp per token (one warp per block), the row's selection keys in dynamic shared memory
// (E <= 8192), so E is not bounded by registers and k costs no rounds:
// 1. keys: order keys of the selection scores (as in the naive kernel; softmax pre needs the
//    row's max and denominator first);
// 2. radix select, 4 passes of 8 bits: a 256-bin histogram of the keys that match the prefix
//    found so far gives the next byte of K*, the k-th largest key;
// 3. selection in index order: every key > K*, then keys == K* by ascending index until k;
// 4. output order (descending key, ascending index) by counting ranks among the k (O(k^2/32)
//    per lane), then the weights as in the naive kernel.
// Shared memory: E keys + 256 bins + k (expert, key) pairs.  Same sets and order as naive.
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias, cached; softmax pre reads the row three times,
// from cache), T*k*(4 + sizeof(index)) written.  Needs sm_80+ for the warp-reduce instructions.
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rounds.cuh"

template <typename T>
__global__ void __launch_bounds__(32)
router_topk_radix(const T* __restrict__ logits, const float* __restrict__ bias, long long num_tokens, int E, int k,
                  int score_fn, int pre_softmax, float scaling, float* __restrict__ weights, long long w_rs,
                  long long w_cs, void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind) {
    extern __shared__ unsigned smem[];
    unsigned* keys = smem;            // [E]
    unsigned* hist = smem + E;        // [256]
    int* sel_e = reinterpret_cast<int*>(hist + 256);  // [k]
    unsigned* sel_k = hist + 256 + k;                 // [k]
    const int lane = threadIdx.x;
    const long long token = blockIdx.x;
    if (token >= num_tokens) return;
    const T* row = logits + token * (long long)E;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    float mx = 0.0f, denom = 1.0f;
    if (pre) {
        float m = DS4_NEG_INF;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, ds4_to_float(row[e]));
        mx = ds4_warp_max(m);
        float sacc = 0.0f;
        for (int e = lane; e < E; e += 32) sacc += expf(ds4_to_float(row[e]) - mx);
        denom = ds4_warp_sum(sacc);
    }
    for (int e = lane; e < E; e += 32)
        keys[e] = ds4_order_key(ds4_sel_score(ds4_to_float(row[e]), e, score_fn, pre, mx, denom, bias));
    // radix select of the k-th largest key
    unsigned prefix = 0u, mask = 0u;
    int remaining = k;  // how many of the keys matching the prefix are still to be taken
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = lane; b < 256; b += 32) hist[b] = 0u;
        __syncwarp();
        for (int e = lane; e < E; e += 32) {
            const unsigned key = keys[e];
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncwarp();
        // lane l owns bins 255 - 8l ... 248 - 8l (from the top); counts from the top down
        unsigned c[8], own = 0u;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            c[j] = hist[255 - 8 * lane - j];
            own += c[j];
        }
        unsigned incl = own;  // inclusive prefix over lanes (higher bins first)
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned v = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += v;
        }
        const unsigned before = incl - own;  // keys in higher bins than this lane's
        const bool here = before < (unsigned)remaining && incl >= (unsigned)remaining;
        const unsigned who = __ballot_sync(0xffffffffu, here);
        const int src = __ffs(who) - 1;
        int bin = 0, above = 0;
        if (lane == src) {
            unsigned run = before;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (run + c[j] >= (unsigned)remaining) {
                    bin = 255 - 8 * lane - j;
                    above = (int)run;
                    break;
                }
                run += c[j];
            }
        }
        bin = __shfl_sync(0xffffffffu, bin, src);
        above = __shfl_sync(0xffffffffu, above, src);
        prefix |= (unsigned)bin << shift;
        mask |= 255u << shift;
        remaining -= above;
        __syncwarp();
    }
    // prefix is K*; take every key > K* and the first `remaining` keys == K*, in index order
    int taken = 0, ties = 0;
    for (int base = 0; base < E; base += 32) {
        const int e = base + lane;
        const unsigned key = e < E ? keys[e] : 0u;
        const bool gt = key > prefix, eq = key == prefix && e < E;
        const unsigned eqm = __ballot_sync(0xffffffffu, eq);
        const int my_tie = ties + __popc(eqm & ((1u << lane) - 1u));
        const bool take = gt || (eq && my_tie < remaining);
        const unsigned tm = __ballot_sync(0xffffffffu, take);
        if (take) {
            const int slot = taken + __popc(tm & ((1u << lane) - 1u));
            sel_e[slot] = e;
            sel_k[slot] = key;
        }
        taken += __popc(tm);
        ties += __popc(eqm);
    }
    __syncwarp();
    // rank of each selected entry: descending key, ascending index (indices are distinct)
    int first = 0;
    for (int i = lane; i < k; i += 32) {
        const unsigned ki = sel_k[i];
        const int ei = sel_e[i];
        int rnk = 0;
        for (int j = 0; j < k; ++j) {
            const unsigned kj = sel_k[j];
            rnk += kj > ki || (kj == ki && sel_e[j] < ei);
        }
        ds4_store_index(indices, idx_kind, token * i_rs + rnk * i_cs, ei);
        if (rnk == 0) first = ei;
    }
    first = (int)__reduce_max_sync(0xffffffffu, (unsigned)first);  // only rank 0's lane holds a nonzero
    __syncwarp();  // the index stores above, before lanes read each other's
    // weights in output order (as in the naive kernel), indices read back
    ds4_write_weights<T>(row, first, lane, k, score_fn, pre, mx, denom, scaling, weights + token * w_rs, w_cs,
                         indices, idx_kind, token * i_rs, i_cs, false, 0);
}
