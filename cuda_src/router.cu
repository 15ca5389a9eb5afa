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
// router_topk_threshold<T, VPL>: the same answer with less work per token.  Each lane takes the
// max of its keys; the k-th largest lane max (k rounds over 32 values, not over E) is a
// threshold that at least k experts reach, so every top-k expert is at or above it.  The few
// experts at or above it (usually k + a few) are compacted one per lane and selected exactly.
// For sqrtsoftplus the screening scores use the fast MUFU approximations (ex2/lg2/sqrt.approx)
// and the threshold is lowered by twice their error bound, so the screen never drops a top-k
// expert; candidates are then scored with the precise functions.  More than 32 candidates
// (heavy ties, NaN rows, k > 32) fall back to the naive rounds: the result is identical.
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias, cached), T*k*(4 + sizeof(index)) written.
// Needs sm_80+ for the warp-reduce instructions.
#include "common.cuh"

#include "router_common.cuh"

// Exact selection score of one expert (what the reference computes, in float32).
__device__ __forceinline__ float ds4_sel_score(float x, int e, int score_fn, bool pre, float mx, float denom,
                                               const float* __restrict__ bias) {
    if (score_fn == DS4_SCORE_SOFTMAX) return pre ? expf(x - mx) / denom : x;
    float s = ds4_score_fn(x, score_fn);
    if (bias != nullptr) s += bias[e];
    return s;
}

// Rank of group `mine` among the num_groups group keys (lane h * stride holds group h's key; every
// lane calls it): the groups with a larger key, or an equal key and a lower id, before it.  The
// top group_topk groups are those of rank < group_topk.  One round of independent shuffles and
// compares (num_groups <= 32), not group_topk dependent rounds of warp reductions.
__device__ __forceinline__ int ds4_group_rank(unsigned gk, int mine, int stride, int num_groups) {
    int rank = 0;
#pragma unroll 8
    for (int h = 0; h < num_groups; ++h) {
        const unsigned kh = __shfl_sync(0xffffffffu, gk, h * stride);
        rank += (kh > gk || (kh == gk && h < mine)) ? 1 : 0;
    }
    return rank;
}

// One round of warp arg-max over the keys this lane holds, key[i] for expert base + stride * i
// (larger key first, lower expert on ties); the owner clears the winner's key.  Returns the
// winner; `slot` is the owner's register slot, -1 on every other lane.
template <int VPL>
__device__ __forceinline__ int ds4_select_round(unsigned (&key)[VPL], int base, int stride, int& slot) {
    unsigned bk = 0u;
    int be = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (key[i] > bk) { bk = key[i]; be = base + stride * i; }
    const unsigned wk = __reduce_max_sync(0xffffffffu, bk);
    const int e = (int)__reduce_min_sync(0xffffffffu, bk == wk ? (unsigned)be : 0xffffffffu);
    slot = -1;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (base + stride * i == e) {
            key[i] = 0u;
            slot = i;
        }
    return e;
}

// The k rounds over all experts, then the weights: the naive algorithm, also the fallback of
// the threshold kernel.  x[] holds this lane's logits (experts lane + 32 i).
// A group score: the sum of the group's top m keys' values, added largest first (as the reference
// does).  Each round takes this lane's best key not yet counted among the slots `in(i)` admits
// (expert `expert(i)`), `best(bk, be)` makes it the best of the group's lanes (larger key, then
// lower expert), and the owner's slot is marked counted (a bit per slot: VPL <= 32).
template <int VPL, typename In, typename Expert, typename Best>
__device__ __forceinline__ float ds4_group_score(const unsigned (&key)[VPL], int m, In in, Expert expert, Best best) {
    unsigned taken = 0u;
    float sum = 0.0f;
    for (int r = 0; r < m; ++r) {
        unsigned bk = 0u;
        int be = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (in(i) && !((taken >> i) & 1u) && key[i] > bk) { bk = key[i]; be = expert(i); }
        best(bk, be);
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (expert(i) == be) taken |= 1u << i;
        const float v = ds4_key_value(bk);
        sum = r == 0 ? v : sum + v;
    }
    return sum;
}

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

template <typename T, int VPL>
__global__ void router_topk_naive(const T* __restrict__ logits,
                                  const float* __restrict__ bias,  // [E] or nullptr
                                  long long num_tokens, int E, int k,
                                  int score_fn, int pre_softmax, float scaling,
                                  float* __restrict__ weights, long long w_rs, long long w_cs,
                                  void* __restrict__ indices, long long i_rs, long long i_cs,
                                  int idx_kind, int num_groups, int group_topk) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (token >= num_tokens) return;  // whole warps leave together
    const T* row = logits + token * (long long)E;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    float x[VPL], mx, denom;
    ds4_load_row<T, VPL>(row, lane, E, pre, x, mx, denom);
    ds4_topk_rounds<T, VPL>(row, bias, x, lane, E, k, score_fn, pre, mx, denom, scaling,
                            weights + token * w_rs, w_cs, indices, token * i_rs, i_cs, idx_kind,
                            num_groups, group_topk);
}

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

// Test probe: the screening approximation next to the precise score, for the error-bound test.
template <int UNUSED>
__global__ void router_ssp_approx_probe(const float* __restrict__ x, float* __restrict__ approx,
                                        float* __restrict__ exact, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    approx[i] = ds4_sqrtsoftplus_approx(x[i]);
    exact[i] = ds4_score_fn(x[i], DS4_SCORE_SQRTSOFTPLUS);
}

// ---------------------------------------------------------------------------------------------
// router_topk_warp<T, SF, GROUPED, VPL>: the compact form with the work per token cut down.
//   - the score function is a template parameter (no per-element run-time switches);
//   - lane l holds the VPL consecutive experts l*VPL ... (16-byte vector loads where rows are
//     16-byte aligned); the expert bias sits in registers for the whole launch, and each warp
//     walks tokens with a grid stride;
//   - screening: each lane's best screening score, the k-th largest of those 32 (k rounds over
//     one value per lane) is a threshold at least k experts reach; the experts at or above it
//     (usually k + a few) are compacted one per lane (shared memory) and selected exactly with
//     k rounds of warp arg-max over one key per lane.  sigmoid / sqrtsoftplus screen with MUFU
//     approximations and a threshold lowered by twice their error bound, then score the
//     candidates with the precise functions; softmax and group-limited routing screen on the
//     exact keys;
//   - GROUPED: the lanes of one group (E / num_groups experts = a power-of-two number of lanes)
//     find the group's top m = k / group_topk scores together (shuffles within the group, all
//     groups at once), then the groups of rank < group_topk stay (ds4_group_rank);
//   - `direct` (host: small T) skips the threshold and candidates where keys are exact (grouped,
//     softmax): k exact rounds over every key, a shorter chain of dependent reductions; grouped
//     sigmoid / sqrtsoftplus with VPL <= 8 sort each lane's keys first (ds4_select_sorted);
//   - more than 32 candidates (heavy ties, NaN screens) fall back to k exact rounds over all
//     experts.
// Same keys, tie rule (larger first, lower index on ties), NaN rule and weights as the naive
// kernel.  k <= 32, E <= 32 * VPL.
#define DS4_WARP_THREADS 256

// This lane's VPL logits: experts e0 ... of the row, the first `valid` of which exist.  With
// vector loads every lane loads unconditionally from an address clamped into the row (lanes
// without a full set then redo theirs with scalar loads): a vector load under a per-lane branch
// was hoisted above it by the compiler and read past the last row (compute-sanitizer).
template <typename T, int VPL>
__device__ __forceinline__ void ds4_load_contig(const T* __restrict__ row, int e0, int E, bool vec, int valid,
                                                float (&x)[VPL]) {
    constexpr int BYTES = VPL * (int)sizeof(T);
    if constexpr (BYTES % 16 == 0) {
        if (vec) {  // uniform; E >= VPL and E * sizeof(T) % 16 == 0 (host)
            const uint4* q = reinterpret_cast<const uint4*>(row + min(e0, E - VPL));
#pragma unroll
            for (int c = 0; c < BYTES / 16; ++c) ds4_unpack16<T, VPL>(q[c], c, x);
            if (valid == VPL) return;
        }
    }
#pragma unroll
    for (int i = 0; i < VPL; ++i) x[i] = i < valid ? ds4_to_float(row[e0 + i]) : 0.0f;
}

// Group-limited routing on the contiguous layout: lanes [g*lpg, (g+1)*lpg) hold group g.
template <int VPL>
__device__ __forceinline__ void ds4_group_mask_contig(unsigned (&key)[VPL], int e0, int lpg, int my_group,
                                                      int num_groups, int m, int group_topk) {
    const float sum = ds4_group_score<VPL>(
        key, m, [](int) { return true; }, [&](int i) { return e0 + i; },
        [&](unsigned& bk, int& be) {  // the group's lpg lanes
            for (int off = 1; off < lpg; off <<= 1) {
                const unsigned ok = __shfl_xor_sync(0xffffffffu, bk, off);
                const int oe = __shfl_xor_sync(0xffffffffu, be, off);
                if (ok > bk || (ok == bk && oe < be)) { bk = ok; be = oe; }
            }
        });
    const int rank = ds4_group_rank(my_group < num_groups ? ds4_order_key(sum) : 0u, my_group, lpg, num_groups);
    if (my_group < num_groups && rank >= group_topk) {
        const unsigned masked = ds4_order_key(DS4_NEG_INF);
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (key[i] != 0u) key[i] = masked;
    }
}

// Small-T exact selection on the contiguous layout (grouped sigmoid / sqrtsoftplus; the keys
// are exact and group-masked): each lane sorts its VPL (key, expert, score) triples once (odd-even
// transposition with strict compares: stable, so lower experts stay first on equal keys), then
// every round is one warp max over the lanes' heads and a ballot: the lowest lane holding the max
// wins (lower lanes hold lower experts), broadcasts its head and shifts its list.  Lane r keeps
// winner r; the normalising sum is added in selection order in every lane, so no reduction
// follows the rounds and no logit is read again.  k <= 32.
template <int VPL>
__device__ __forceinline__ void ds4_select_sorted(unsigned (&key)[VPL], const float (&u)[VPL], int e0, int lane,
                                                  int k, float scaling, float* __restrict__ wrow, long long w_cs,
                                                  void* __restrict__ indices, long long irow, long long i_cs,
                                                  int idx_kind) {
    int e[VPL];
    float v[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        e[i] = e0 + i;
        v[i] = u[i];
    }
#pragma unroll
    for (int r = 0; r < VPL; ++r) {
#pragma unroll
        for (int i = r & 1; i + 1 < VPL; i += 2) {
            if (key[i + 1] > key[i]) {
                const unsigned tk = key[i]; key[i] = key[i + 1]; key[i + 1] = tk;
                const int te = e[i]; e[i] = e[i + 1]; e[i + 1] = te;
                const float tv = v[i]; v[i] = v[i + 1]; v[i + 1] = tv;
            }
        }
    }
    float tot = 0.0f, mv = 0.0f;
    int me = 0;
    for (int r = 0; r < k; ++r) {
        const unsigned wk = __reduce_max_sync(0xffffffffu, key[0]);
        const int wl = __ffs(__ballot_sync(0xffffffffu, key[0] == wk)) - 1;
        const int we = __shfl_sync(0xffffffffu, e[0], wl);
        const float wv = __shfl_sync(0xffffffffu, v[0], wl);
        if (lane == wl) {
#pragma unroll
            for (int i = 0; i + 1 < VPL; ++i) {
                key[i] = key[i + 1];
                e[i] = e[i + 1];
                v[i] = v[i + 1];
            }
            key[VPL - 1] = 0u;
        }
        tot += wv;
        if (lane == r) {
            me = we;
            mv = wv;
        }
    }
    if (lane < k) {
        wrow[lane * w_cs] = (k > 1 ? mv / (tot + 1e-20f) : mv) * scaling;
        ds4_store_index(indices, idx_kind, irow + lane * i_cs, me);
    }
}

template <typename T, int SF, bool GROUPED, int VPL>
__global__ void __launch_bounds__(DS4_WARP_THREADS, 2)
router_topk_warp(const T* __restrict__ logits, const float* __restrict__ bias, long long num_tokens, int E, int k,
                 float scaling, int vec, float* __restrict__ weights, long long w_rs, long long w_cs,
                 void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind, int num_groups,
                 int group_topk, int direct) {
    constexpr bool EXACT = GROUPED || SF == DS4_SF_SOFTMAX_POST || SF == DS4_SF_SOFTMAX_PRE;
    constexpr bool SOFTMAX = SF == DS4_SF_SOFTMAX_POST || SF == DS4_SF_SOFTMAX_PRE;
    __shared__ int s_e[DS4_WARP_THREADS];
    __shared__ unsigned s_k[DS4_WARP_THREADS];
    __shared__ float s_v[DS4_WARP_THREADS];
    const int lane = threadIdx.x & 31;
    const int wib = threadIdx.x >> 5;
    int* le = s_e + 32 * wib;
    unsigned* lk = s_k + 32 * wib;
    float* lv = s_v + 32 * wib;
    const int e0 = lane * VPL;
    const int nvalid = max(0, min(VPL, E - e0));
    float b[VPL];
#pragma unroll
    for (int i = 0; i < VPL; ++i) b[i] = (!SOFTMAX && bias != nullptr && i < nvalid) ? bias[e0 + i] : 0.0f;
    int lpg = 1, my_group = 0, m = 0;
    if constexpr (GROUPED) {
        lpg = E / num_groups / VPL;
        my_group = lane / lpg;
        m = k / group_topk;
    }
    const long long stride = (long long)gridDim.x * (DS4_WARP_THREADS / 32);
    for (long long token = (long long)blockIdx.x * (DS4_WARP_THREADS / 32) + wib; token < num_tokens;
         token += stride) {
        const T* row = logits + token * (long long)E;
        float x[VPL];
        ds4_load_contig<T, VPL>(row, e0, E, vec != 0, nvalid, x);
        float mx = 0.0f, denom = 1.0f;
        if constexpr (SF == DS4_SF_SOFTMAX_PRE) {
            float mm = DS4_NEG_INF;
#pragma unroll
            for (int i = 0; i < VPL; ++i)
                if (i < nvalid) mm = fmaxf(mm, x[i]);
            mx = ds4_warp_max(mm);
            float sacc = 0.0f;
#pragma unroll
            for (int i = 0; i < VPL; ++i)
                if (i < nvalid) sacc += expf(x[i] - mx);
            denom = ds4_warp_sum(sacc);
        }
        // 1. screening values and the threshold (k-th largest lane best, lowest lane on ties)
        unsigned key[VPL];  // EXACT: exact order keys (0: no expert)
        float u[VPL];       // EXACT: the weight's source (x for softmax, p for pre, the unbiased score)
        float a[VPL];       // !EXACT: screening scores (NaN: no expert)
        unsigned lbest;
        if constexpr (EXACT) {
            lbest = 0u;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                float s;
                if constexpr (SF == DS4_SF_SOFTMAX_POST) {
                    s = x[i];
                    u[i] = s;
                } else if constexpr (SF == DS4_SF_SOFTMAX_PRE) {
                    s = expf(x[i] - mx) / denom;
                    u[i] = s;
                } else {
                    u[i] = ds4_unbiased<SF>(x[i]);
                    s = u[i] + b[i];
                }
                key[i] = i < nvalid ? ds4_order_key(s) : 0u;
            }
            if constexpr (GROUPED) ds4_group_mask_contig<VPL>(key, e0, lpg, my_group, num_groups, m, group_topk);
            if constexpr (GROUPED && !SOFTMAX && VPL <= 8) {
                if (direct) {
                    ds4_select_sorted<VPL>(key, u, e0, lane, k, scaling, weights + token * w_rs, w_cs, indices,
                                           token * i_rs, i_cs, idx_kind);
                    continue;
                }
            }
#pragma unroll
            for (int i = 0; i < VPL; ++i) lbest = max(lbest, key[i]);
        } else {
            float best = __int_as_float(0x7fffffff);
#pragma unroll
            for (int i = 0; i < VPL; ++i) {  // computed for every slot (no branches), NaN where no expert
                const float s = (SF == DS4_SF_SIGMOID ? ds4_sigmoid_approx(x[i]) : ds4_sqrtsoftplus_approx(x[i])) + b[i];
                a[i] = i < nvalid ? s : __int_as_float(0x7fffffff);
                best = fmaxf(best, a[i]);  // NaN only when every value is NaN
            }
            lbest = nvalid > 0 ? ds4_order_key(best) : 0u;
        }
        // (keys with their low 5 bits replaced by the lane: one reduction per round; the
        // truncated threshold is at most the exact one, so the candidates stay a superset)
        unsigned theta = 0u;
        unsigned cm = 0u;
        int cnt = 0, total = 0;
        const bool all_rounds = EXACT && direct;  // exact keys, k rounds over all of them (shorter chain)
        if (!all_rounds) {
            unsigned mm = lbest >= 32u ? (lbest & ~31u) | (unsigned)lane : 0u;
            for (int r = 0; r < k; ++r) {
                theta = __reduce_max_sync(0xffffffffu, mm);
                if (mm == theta) mm = 0u;
            }
            theta &= ~31u;
            // 2. candidates
            if constexpr (EXACT) {
#pragma unroll
                for (int i = 0; i < VPL; ++i)
                    if (key[i] != 0u && key[i] >= theta) cm |= 1u << i;
            } else {
                const float th = ds4_key_to_float(theta);
                const float lo = fabsf(th) == __int_as_float(0x7f800000)
                                     ? th
                                     : th - 2.0f * ds4_screen_err<SF>(fabsf(th));
#pragma unroll
                for (int i = 0; i < VPL; ++i)
                    if (a[i] >= lo) cm |= 1u << i;
            }
            cnt = __popc(cm);
            total = (int)__reduce_add_sync(0xffffffffu, (unsigned)cnt);
        }
        bool sel;
        int slot, ce;
        float cv;  // x (softmax post), p (pre) or the unbiased score of this lane's expert
        if (!all_rounds && total <= 32 && (EXACT || theta >= 2u)) {
            // 3. compact: one candidate per lane
            int incl = cnt;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int t = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += t;
            }
            const int base = incl - cnt;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                const int pos = base + __popc(cm & ((1u << i) - 1u));  // predicated stores, no branches
                if ((cm >> i) & 1u) {
                    le[pos] = e0 + i;
                    if constexpr (EXACT) {
                        lk[pos] = key[i];
                        lv[pos] = u[i];
                    }
                }
            }
            __syncwarp();
            const bool has = lane < total;
            ce = has ? le[lane] : 0x7fffffff;
            unsigned ck = 0u;
            cv = 0.0f;
            if constexpr (EXACT) {
                if (has) {
                    ck = lk[lane];
                    cv = lv[lane];
                }
            } else if (has) {
                cv = ds4_unbiased<SF>(ds4_to_float(row[ce]));
                ck = ds4_order_key(bias != nullptr ? cv + bias[ce] : cv);
            }
            __syncwarp();
            // 4. exact selection among the candidates
            slot = -1;
            for (int r = 0; r < k; ++r) {
                const unsigned wk = __reduce_max_sync(0xffffffffu, ck);
                const unsigned we = __reduce_min_sync(0xffffffffu, ck == wk ? (unsigned)ce : 0xffffffffu);
                if (ck == wk && (unsigned)ce == we) {
                    slot = r;
                    ck = 0u;
                }
            }
            sel = slot >= 0;
        } else {
            // fallback: k exact rounds over every expert; lane j ends up holding winner j
            unsigned fk[VPL];
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                if constexpr (EXACT) {
                    fk[i] = key[i];
                } else {
                    const float s = ds4_unbiased<SF>(x[i]);
                    fk[i] = i < nvalid ? ds4_order_key(bias != nullptr ? s + b[i] : s) : 0u;
                }
            }
            int mine = 0;
            for (int r = 0; r < k; ++r) {
                int fslot;
                const int e = ds4_select_round<VPL>(fk, e0, 1, fslot);
                if (lane == r) mine = e;
            }
            sel = lane < k;
            slot = lane;
            ce = mine;
            cv = 0.0f;
            if (sel) {
                const float xe = ds4_to_float(row[mine]);
                if constexpr (SF == DS4_SF_SOFTMAX_POST) cv = xe;
                else if constexpr (SF == DS4_SF_SOFTMAX_PRE) cv = expf(xe - mx) / denom;
                else cv = ds4_unbiased<SF>(xe);
            }
        }
        // 5. weights (as the naive kernel)
        float v = sel ? cv : 0.0f;
        if constexpr (SF == DS4_SF_SOFTMAX_POST) {
            const unsigned first = __ballot_sync(0xffffffffu, slot == 0);
            const float x0 = __shfl_sync(0xffffffffu, cv, __ffs(first) - 1);
            v = sel ? expf(cv - x0) : 0.0f;
        }
        float w = v;
        if constexpr (SF == DS4_SF_SOFTMAX_PRE) {
            w = v * scaling;
        } else {
            const float tot = ds4_warp_sum(v);
            const bool norm = SOFTMAX || k > 1;
            const float dn = SOFTMAX ? tot : tot + 1e-20f;
            if (sel) w = (norm ? v / dn : v) * scaling;  // lanes without an output skip the division
        }
        if (sel) {
            weights[token * w_rs + slot * w_cs] = w;
            ds4_store_index(indices, idx_kind, token * i_rs + slot * i_cs, ce);
        }
    }
}

// Test probe: a screening approximation next to the precise score (SF 1: sigmoid, 2: sqrtsoftplus).
template <int SF>
__global__ void router_screen_probe(const float* __restrict__ x, float* __restrict__ approx,
                                    float* __restrict__ exact, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    approx[i] = SF == DS4_SF_SIGMOID ? ds4_sigmoid_approx(x[i]) : ds4_sqrtsoftplus_approx(x[i]);
    exact[i] = ds4_unbiased<SF>(x[i]);
}

// ---------------------------------------------------------------------------------------------
// TE dense form and its backward.

template <typename T>
__device__ __forceinline__ T ds4_from_float(float v);
template <>
__device__ __forceinline__ float ds4_from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half ds4_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 ds4_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

#define DS4_MAP_NONE 0
#define DS4_MAP_BYTES 1
#define DS4_MAP_BITS 2
#define DS4_MAP_INDICES 3
#define DS4_MAP_ALL 4  // every expert counts as selected (the aux-loss scores' backward)
#define DS4_DENSE_WARPS 4
#define DS4_BITMAP_WORDS 96  // E <= 3072

// router_topk_dense_naive<T, VPL>: TE's dense form in one launch.  One warp per token: the naive
// selection (as router_topk_naive) writes the compact weights to a float32 [T, k] scratch and the
// indices to the caller's dense index buffer (int16/32/64) or an int32 [T, k] scratch; then the
// warp writes the dense rows: probs (0 except the selected weights), the float32 intermediate for
// backward (softmax pre: the full softmax; post: -inf except the softmax over the selected;
// sigmoid: s; sqrtsoftplus: the logits) and the routing map (bytemap or LSB-first bitmap; none
// with dense indices).  Owner lanes fill each dense row, __syncwarp orders those stores before
// the k selected entries are scattered over them.
// Bytes: T*E*sizeof(T) read; T*E*(sizeof(T) + 4 + map) written (+ T*k*8 scratch, cached).
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

// router_topk_backward_naive<T, V>: grad_logits of the dense form.  One warp per token; each lane
// takes V consecutive experts at a time (V = 4: vector loads/stores, needs E % 4 == 0 and aligned
// rows; V = 1 otherwise) and strides over the row twice (sums over the selected set, then the
// gradient; the second pass re-reads from cache).  routing: bytemap, bitmap, or dense indices
// (map_kind 3: only the k selected entries are gathered and the rest of the row is zero-filled,
// except for softmax pre, whose gradient reaches every expert; entries outside [0, E) select
// nothing; the host uses router_topk_backward_idx below unless softmax pre).  g = grad * scaling; act = the
// forward's intermediate:
//   softmax:  dot = sum_R g*act; pre: act*(g_R - dot) on every e; post: act*(g - dot) on R.
//   sigmoid / sqrtsoftplus: s = act or sqrt(softplus(act)); k > 1: S = sum_R s + eps,
//     D = sum_R g*s, gs = g/S - D/S^2 on R; k = 1: gs = g on R; then * s(1-s), or
//     * sigmoid(x)/(2s + eps) (x > 20: 1/(2s + eps)) for sqrtsoftplus.
// Bytes: map: T*E*(2*sizeof(T) + 4 + map); indices: T*k*(sizeof(T) + 4 + idx) + T*E*sizeof(T).
struct BwdCtx {
    int score_fn, k;
    bool softmax, pre;
    float scaling, s1, s2;  // s1: dot (softmax) or S - eps; s2: D
};

__device__ __forceinline__ void bwd_accumulate(const BwdCtx& c, float g, float a, float& s1, float& s2) {
    if (c.softmax) {
        s1 += g * a;
    } else {
        const float s = c.score_fn == DS4_SCORE_SIGMOID ? a : ds4_score_fn(a, DS4_SCORE_SQRTSOFTPLUS);
        s1 += s;
        s2 += g * s;
    }
}

// gradient of one expert; g is already scaled and zero when not selected
__device__ __forceinline__ float bwd_value(const BwdCtx& c, float g, float a, bool sel) {
    const float eps = 1e-20f;
    if (c.softmax) return (c.pre || sel) ? a * (g - c.s1) : 0.0f;
    if (!sel) return 0.0f;
    const float s = c.score_fn == DS4_SCORE_SIGMOID ? a : ds4_score_fn(a, DS4_SCORE_SQRTSOFTPLUS);
    const float S = c.s1 + eps;
    const float gs = c.k > 1 ? g / S - c.s2 / (S * S) : g;
    if (c.score_fn == DS4_SCORE_SIGMOID) return gs * s * (1.0f - s);
    return gs * ((a > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-a))) / (2.0f * s + eps));
}

template <typename T, int V>
struct BwdVec;
template <typename T>
struct BwdVec<T, 1> {
    static __device__ __forceinline__ void load(const T* g, const float* a, float (&gv)[1], float (&av)[1]) {
        gv[0] = ds4_to_float(*g);
        av[0] = *a;
    }
    static __device__ __forceinline__ void store(T* o, const float (&v)[1]) { *o = ds4_from_float<T>(v[0]); }
};
template <typename T>
struct BwdVec<T, 4> {
    static __device__ __forceinline__ void load(const T* g, const float* a, float (&gv)[4], float (&av)[4]) {
        if constexpr (sizeof(T) == 4) {
            const float4 x = *reinterpret_cast<const float4*>(g);
            gv[0] = x.x; gv[1] = x.y; gv[2] = x.z; gv[3] = x.w;
        } else {
            const uint2 u = *reinterpret_cast<const uint2*>(g);
            const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
            for (int i = 0; i < 4; ++i) gv[i] = ds4_to_float(h[i]);
        }
        const float4 y = *reinterpret_cast<const float4*>(a);
        av[0] = y.x; av[1] = y.y; av[2] = y.z; av[3] = y.w;
    }
    static __device__ __forceinline__ void store(T* o, const float (&v)[4]) {
        if constexpr (sizeof(T) == 4) {
            *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            uint2 u;
            T* h = reinterpret_cast<T*>(&u);
#pragma unroll
            for (int i = 0; i < 4; ++i) h[i] = ds4_from_float<T>(v[i]);
            *reinterpret_cast<uint2*>(o) = u;
        }
    }
};

// selection bits of experts e .. e + V - 1 (bit i: expert e + i)
template <int V>
__device__ __forceinline__ unsigned bwd_sel(const unsigned char* __restrict__ m, int map_kind, int e) {
    if (map_kind == DS4_MAP_ALL) return (1u << V) - 1u;
    if (map_kind == DS4_MAP_BITS) return (m[e >> 3] >> (e & 7)) & ((1u << V) - 1u);
    if (V == 4) {
        const uchar4 b = *reinterpret_cast<const uchar4*>(m + e);
        return (b.x != 0) | ((b.y != 0) << 1) | ((b.z != 0) << 2) | ((b.w != 0) << 3);
    }
    return m[e] != 0;
}

template <typename T, int V>
__global__ void router_topk_backward_naive(const T* __restrict__ grad, const float* __restrict__ inter,
                                           const void* __restrict__ routing, int map_kind, int idx_kind,
                                           long long i_rs, long long i_cs, long long num_tokens, int E, int k,
                                           int score_fn, int pre_softmax, float scaling, T* __restrict__ grad_logits) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * DS4_DENSE_WARPS + (threadIdx.x >> 5);
    if (token >= num_tokens) return;
    const T* grow = grad + token * (long long)E;
    const float* arow = inter + token * (long long)E;
    T* orow = grad_logits + token * (long long)E;
    BwdCtx c;
    c.score_fn = score_fn;
    c.k = k;
    c.softmax = score_fn == DS4_SCORE_SOFTMAX;
    c.pre = c.softmax && pre_softmax;
    c.scaling = scaling;
    float s1 = 0.0f, s2 = 0.0f;
    if (map_kind == DS4_MAP_INDICES) {
        const long long irow = token * i_rs;
        // the unselected entries: zero (written first, overlapping the gathers' latency), or
        // -act*dot for softmax pre (after the sums)
        if (!c.pre) {
            const float zero[V] = {};
            for (int e = V * lane; e < E; e += 32 * V) BwdVec<T, V>::store(orow + e, zero);
        }
        for (int j = lane; j < k; j += 32) {
            const int e = ds4_load_index(routing, idx_kind, irow + j * i_cs);
            if ((unsigned)e < (unsigned)E) bwd_accumulate(c, ds4_to_float(grow[e]) * scaling, arow[e], s1, s2);
        }
        c.s1 = ds4_warp_sum(s1);
        c.s2 = ds4_warp_sum(s2);
        if (c.pre) {
            for (int e = V * lane; e < E; e += 32 * V) {
                float gv[V], av[V], out[V];
                BwdVec<T, V>::load(grow + e, arow + e, gv, av);
#pragma unroll
                for (int i = 0; i < V; ++i) out[i] = av[i] * (0.0f - c.s1);
                BwdVec<T, V>::store(orow + e, out);
            }
        }
        __syncwarp();
        for (int j = lane; j < k; j += 32) {
            const int e = ds4_load_index(routing, idx_kind, irow + j * i_cs);
            if ((unsigned)e < (unsigned)E)
                orow[e] = ds4_from_float<T>(bwd_value(c, ds4_to_float(grow[e]) * scaling, arow[e], true));
        }
        return;
    }
    const unsigned char* m = map_kind == DS4_MAP_ALL ? nullptr
                             : static_cast<const unsigned char*>(routing) +
                                   token * (long long)(map_kind == DS4_MAP_BITS ? (E + 7) >> 3 : E);
    for (int e = V * lane; e < E; e += 32 * V) {
        float gv[V], av[V];
        BwdVec<T, V>::load(grow + e, arow + e, gv, av);
        const unsigned sel = bwd_sel<V>(m, map_kind, e);
#pragma unroll
        for (int i = 0; i < V; ++i)
            if ((sel >> i) & 1u) bwd_accumulate(c, gv[i] * scaling, av[i], s1, s2);
    }
    c.s1 = ds4_warp_sum(s1);
    c.s2 = ds4_warp_sum(s2);
    for (int e = V * lane; e < E; e += 32 * V) {
        float gv[V], av[V], out[V];
        BwdVec<T, V>::load(grow + e, arow + e, gv, av);
        const unsigned sel = bwd_sel<V>(m, map_kind, e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const bool on = (sel >> i) & 1u;
            out[i] = bwd_value(c, on ? gv[i] * scaling : 0.0f, av[i], on);
        }
        BwdVec<T, V>::store(orow + e, out);
    }
}

// router_topk_backward_idx<T, SEG>: grad_logits from dense indices, every score function except
// softmax pre (whose gradient reaches every expert: the kernel above).  A segment of SEG lanes per
// token (host: 16 for 16-bit gradients and k <= 16, else 32), so a warp has 32 / SEG rows in
// flight: each lane gathers entry j = its segment lane (+ SEG ...), the warp zero-fills its rows
// (one contiguous span; 16-byte stores when `vec`: E * sizeof(T) % 16 == 0 and an aligned base),
// the sums go through log2(SEG) shuffles inside the segment, and each lane writes its entries over
// the zeros (__syncwarp orders the two within the warp).  Index entries outside [0, E) select nothing.  Same formulas as
// bwd_accumulate / bwd_value.  Bytes: T*k*(sizeof(T) + 4 + idx) + T*E*sizeof(T).
// (__launch_bounds__ with 4 blocks per SM: without a minimum, ptxas for sm_80 settled on 32
// registers for the 16-bit forms and spilled.)
template <typename T, int SEG>
__global__ void __launch_bounds__(32 * DS4_DENSE_WARPS, 4)
router_topk_backward_idx(const T* __restrict__ grad, const float* __restrict__ inter, const void* __restrict__ routing,
                         int idx_kind, long long i_rs, long long i_cs, long long num_tokens, int E, int k,
                         int score_fn, float scaling, int vec, T* __restrict__ grad_logits) {
    constexpr int R = 32 / SEG;  // rows per warp
    const int lane = threadIdx.x & 31;
    const long long t0 = ((long long)blockIdx.x * DS4_DENSE_WARPS + (threadIdx.x >> 5)) * R;
    if (t0 >= num_tokens) return;
    const int nr = (int)min((long long)R, num_tokens - t0);
    const int sl = lane % SEG;
    const long long token = t0 + lane / SEG;
    const bool live = lane / SEG < nr;
    const T* grow = grad + token * (long long)E;
    const float* arow = inter + token * (long long)E;
    // this lane's first entry, gathered before the zero fill is issued (the fill's stores overlap
    // the loads' latency; gathering after the fill measured 1-8% slower)
    int e0 = live && sl < k ? ds4_load_index(routing, idx_kind, token * i_rs + sl * i_cs) : -1;
    e0 = (unsigned)e0 < (unsigned)E ? e0 : -1;
    float g0 = 0.0f, a0 = 0.0f;
    if (e0 >= 0) {
        g0 = ds4_to_float(grow[e0]) * scaling;
        a0 = arow[e0];
    }
    {
        T* span = grad_logits + t0 * (long long)E;
        const int n = nr * E;
        int head = 0;
        if (vec) {
            constexpr int PER = 16 / (int)sizeof(T);
            uint4* q = reinterpret_cast<uint4*>(span);
            const int nv = n / PER;
            for (int i = lane; i < nv; i += 32) q[i] = make_uint4(0u, 0u, 0u, 0u);
            head = nv * PER;
        }
        const T zero = ds4_from_float<T>(0.0f);
        for (int i = head + lane; i < n; i += 32) span[i] = zero;
    }
    BwdCtx c;
    c.score_fn = score_fn;
    c.k = k;
    c.softmax = score_fn == DS4_SCORE_SOFTMAX;
    c.pre = false;
    c.scaling = scaling;
    float s1 = 0.0f, s2 = 0.0f;
    if (e0 >= 0) bwd_accumulate(c, g0, a0, s1, s2);
    if (live) {
        for (int j = sl + SEG; j < k; j += SEG) {  // k > SEG
            const int e = ds4_load_index(routing, idx_kind, token * i_rs + j * i_cs);
            if ((unsigned)e < (unsigned)E) bwd_accumulate(c, ds4_to_float(grow[e]) * scaling, arow[e], s1, s2);
        }
    }
#pragma unroll
    for (int off = SEG / 2; off > 0; off >>= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
        s2 += __shfl_xor_sync(0xffffffffu, s2, off);
    }
    c.s1 = s1;
    c.s2 = s2;
    __syncwarp();
    if (!live) return;
    T* orow = grad_logits + token * (long long)E;
    if (e0 >= 0) orow[e0] = ds4_from_float<T>(bwd_value(c, g0, a0, true));
    for (int j = sl + SEG; j < k; j += SEG) {  // k > SEG: the rest, read again (cached)
        const int e = ds4_load_index(routing, idx_kind, token * i_rs + j * i_cs);
        if ((unsigned)e < (unsigned)E)
            orow[e] = ds4_from_float<T>(bwd_value(c, ds4_to_float(grow[e]) * scaling, arow[e], true));
    }
}

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

// ---------------------------------------------------------------------------------------------
// router_topk_radix<T>: one warp per token (one warp per block), the row's selection keys in
// dynamic shared memory (E <= 8192), so E is not bounded by registers and k costs no rounds:
// 1. keys: order keys of the selection scores (as in the naive kernel; softmax pre needs the
//    row's max and denominator first);
// 2. radix select, 4 passes of 8 bits: a 256-bin histogram of the keys that match the prefix
//    found so far gives the next byte of K*, the k-th largest key;
// 3. selection in index order: every key > K*, then keys == K* by ascending index until k;
// 4. output order (descending key, ascending index) by counting ranks among the k (O(k^2/32)
//    per lane), then the weights as in the naive kernel.
// Shared memory: E keys + 256 bins + k (expert, key) pairs.  Same sets and order as naive.
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
