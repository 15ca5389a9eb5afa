// router_topk_warp<T, SF, GROUPED, VPL> — router top-k (compact form: weights [T, k] float32,
// indices [T, k]) with the work per token cut down ("screened"; GROUPED: "grouped").
//
// Thread layout: blocks of DS4_WARP_THREADS, one warp per token, each warp walking tokens with a
// grid stride.
//   - the score function is a template parameter (no per-element run-time switches);
//   - lane l holds the VPL consecutive experts l*VPL ... (16-byte vector loads where rows are
//     16-byte aligned); the expert bias sits in registers for the whole launch;
//   - screening: each lane's best screening score, the k-th largest of those 32 (k rounds over
//     one value per lane) is a threshold at least k experts reach; the experts at or above it
//     (usually k + a few) are compacted one per lane (shared memory) and selected exactly with
//     k rounds of warp arg-max over one key per lane.  sigmoid / sqrtsoftplus screen with MUFU
//     approximations (router_common.cuh) and a threshold lowered by twice their error bound, then
//     score the candidates with the precise functions; softmax and group-limited routing screen
//     on the exact keys;
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
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias per warp, once), T*k*(4 + sizeof(index)) written.
// Needs sm_80+ for the warp-reduce instructions.
#include "../common/common.cuh"
#include "router_common.cuh"

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
