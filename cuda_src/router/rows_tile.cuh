// The rows router's per-token work (ds4_rows_tile: steps 1-3 of rows_common.cuh and the stores,
// with the group-limited steps of router_topk_rows_grouped under GROUPED) and the tile of tokens
// a warp takes (ds4_rows_topk), shared by rows.cu and rows_grouped.cu.  Thread layout and bytes:
// rows_common.cuh.
#pragma once
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rows_common.cuh"

// One token's row (LPT lanes): steps 1-3 and the stores.  `row` reads this lane's token's row;
// lanes with !valid redo a token of the tile and write nothing.
// Group-limited routing (GROUPED, router_topk_rows_grouped): num_groups groups of E / num_groups
// experts, a multiple of 16 (each lane holds whole chunks of every group), m = k / group_topk <= 2.
// Step 1 also keeps, per group, the top two screened selection scores of the lane's chunks; at a
// group's last chunk the two lanes of the token merge theirs and add the top m (the group score,
// within m * eps of the exact one).  The top group_topk groups by those screened sums are the exact
// ones when the last kept sum is more than 2 m eps above the first dropped one; otherwise
// (near-ties: ~0.04% of random rows with the sigmoid screen's bound; non-finite sums) the group
// scores are computed exactly, as the reference does (ds4_rows_exact_groups: one more pass over the
// row, no list), and the row goes on screened with those groups; only where a kept group's score is
// not a number (experts of the other groups, -inf, can then win over NaN scores) does the row take
// the exact path.  tau and the live chunks come from the kept groups' chunks only; the rest is as
// without groups.
template <typename T, int SF, int KMAX, int LPT, bool GROUPED>
__device__ __forceinline__ void
ds4_rows_tile(const Ds4Row<T> row, long long token, bool valid, float* candx, unsigned char* cand, const float* sb,
              float babs, bool has_bias, int E, int k, float scaling, float* __restrict__ weights, long long w_rs,
              long long w_cs, void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind,
              int num_groups, int group_topk) {
    using ROW = Ds4Row<T>;
    constexpr int CAP = ds4_rows_cap<KMAX, GROUPED>();
    constexpr int MAXC = DS4_ROWS_MAX_CH / LPT;      // chunks per lane
    const int lane = threadIdx.x & 31;
    const int q = lane % LPT;  // which chunks of the row: q, q + LPT, q + 2 LPT, ...
    // (alternate chunks, not halves: the two lanes of a token read 32 consecutive bytes per load,
    // whole sectors, instead of two half sectors whose other halves must wait in L1 for the next
    // chunk's load; the list keys (key, expert) make the merge independent of which lane had what)
    const int ncl = E / 8 / LPT;
    const bool plain = !GROUPED && !has_bias;
    // (grouped) chunks per lane in a group, top m per group; the lane's group scores go to a column
    // of the candidates' table (read before step 2 writes candidates, each lane its own column)
    const int cpl = GROUPED ? E / num_groups / (8 * LPT) : 1;
    const int m = GROUPED ? k / group_topk : 1;
    float* sgs = candx;
    float g0 = DS4_NEG_INF, g1 = DS4_NEG_INF;  // the lane's top two of the current group
    int gc = 0, gi = 0;                         // chunks of the current group seen, group index

    // 1. chunk bounds and tau
    float up[MAXC];
    float tl[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) tl[j] = DS4_NEG_INF;
    // A ring of PD chunks in flight: chunk hh + PD is requested before chunk hh is worked on (the
    // compiler did not hoist the loads past the per-chunk work by itself: one round trip to L2 per
    // chunk, bench/lab/NOTEBOOK.md).  Loads are clamped into the lane's chunks, so always in bounds.
    constexpr int PD = ROW::PD;
    uint4 ring[PD][ROW::RAW];
#pragma unroll
    for (int p = 0; p < PD; ++p) row.raw(q + LPT * min(p, ncl - 1), ring[p]);
#pragma unroll
    for (int hh = 0; hh < MAXC; ++hh) {
        up[hh] = DS4_NEG_INF;
        float x[8];
        ROW::unpack(ring[hh % PD], x);
        if (hh + PD < MAXC) row.raw(q + LPT * min(hh + PD, ncl - 1), ring[hh % PD]);
        if (hh < ncl) {
            const int h = q + LPT * hh;
            float lo;
            if constexpr (GROUPED) {  // every expert screened; the group's top two as well
                float bb[8];
                ds4_chunk_bias(sb, h, bb);
                lo = DS4_NEG_INF;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float v = fmaxf(ds4_screen<SF>(x[j]) + bb[j], DS4_NEG_INF);  // NaN -> -inf
                    lo = fmaxf(lo, v);
                    g1 = fmaxf(g1, fminf(g0, v));
                    g0 = fmaxf(g0, v);
                }
                if (++gc == cpl) {  // the lane's last chunk of group gi: merge with the other lane's
                    const float o0 = __shfl_xor_sync(0xffffffffu, g0, 1);
                    const float o1 = __shfl_xor_sync(0xffffffffu, g1, 1);
                    const float a = fmaxf(g0, o0), b = fmaxf(fminf(g0, o0), fmaxf(g1, o1));
                    sgs[gi * 32 + lane] = m == 1 ? a : a + b;
                    sgs[(16 + gi) * 32 + lane] = m == 1 ? a : b;  // the group's m-th screened score
                    g0 = g1 = DS4_NEG_INF;
                    gc = 0;
                    ++gi;
                }
            } else if (plain) {  // no bias: the score of the largest logit is the chunk's best
                lo = ds4_screen<SF>(ds4_max8(x));
            } else {  // with bias every expert is screened (the bias reorders the chunk)
                float bb[8];
                ds4_chunk_bias(sb, h, bb);
                lo = ds4_screen<SF>(x[0]) + bb[0];
#pragma unroll
                for (int j = 1; j < 8; ++j) lo = fmaxf(lo, ds4_screen<SF>(x[j]) + bb[j]);
            }
            lo = lo == lo ? lo : DS4_NEG_INF;  // an all-NaN chunk bounds nothing
            up[hh] = lo;
            if constexpr (!GROUPED) ds4_insert_desc(tl, lo);  // (grouped: after the group choice, kept chunks)
        }
    }
    bool gsure = true;  // (grouped) the screened group choice is the exact one
    if constexpr (GROUPED) {
        // kmin / dmax: the group_topk-th and (group_topk + 1)-th largest screened sums (a sorted
        // list of 8: group_topk <= 7, or every group kept); the kept groups are those >= kmin
        // (exactly group_topk of them when kmin > dmax, the only case used without the exact sums)
        float gl[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) gl[j] = DS4_NEG_INF;
        for (int g = 0; g < num_groups; ++g) {
            float v = sgs[g * 32 + lane];
            gsure = gsure && fabsf(v) < __int_as_float(0x7f800000);  // no NaN / inf sums
            ds4_insert_desc(gl, fmaxf(v, DS4_NEG_INF));
        }
        float kmin = gl[0], dmax = DS4_NEG_INF;
#pragma unroll
        for (int j = 1; j < 8; ++j) {
            kmin = j < group_topk ? gl[j] : kmin;
            dmax = j == group_topk ? gl[j] : dmax;
        }
        unsigned kept = 0xffffffffu;
        if (group_topk < num_groups) {
            kept = 0u;
            for (int g = 0; g < num_groups; ++g)
                if (sgs[g * 32 + lane] >= kmin) kept |= 1u << g;
        }
        // each of the m screened terms of a sum S is within ABS + REL (|s| + rounding) of the exact
        // one, |s| <= |S| + 2 max |bias|; 2x on REL covers the float32 roundings of both sums
        auto ev = [&](float S) { return ds4_screen_err<SF>(2.0f * (fabsf(S) + 2.0f * babs)); };  // one term
        auto dl = [&](float S) { return (float)m * ev(S); };                                // a sum
        const bool sfin = gsure;  // every screened sum a number
        if (sfin && group_topk < num_groups) gsure = kmin - dl(kmin) > dmax + dl(dmax);
        if (!gsure && sfin) {
            // Near-tie: only the groups whose exact sum may fall on the other side get exact sums
            // (a kept group within 2 delta of the largest dropped sum, a dropped one within 2 delta
            // of the smallest kept); the others keep their side.  A group's exact top m are among
            // its experts screened at or above its m-th screened score minus 2 eps, so only those
            // are scored exactly; the keys and the sum are the reference's.  Both lanes of the
            // token are here (same sums); each has cpl chunks of the group, re-read from L1 / L2.
            const unsigned pair = 3u << (lane & ~1);
            unsigned unc = 0u, sure = 0u;
            for (int g = 0; g < num_groups; ++g) {
                const float sg = sgs[g * 32 + lane];
                if (sg - dl(sg) > dmax + dl(dmax)) {         // above every group not in the top group_topk
                    sure |= 1u << g;
                } else if (!(sg + dl(sg) < kmin - dl(kmin))) {  // (else below the top group_topk)
                    unc |= 1u << g;
                }
            }
            for (unsigned u = unc; u; u &= u - 1u) {
                const int g = __ffs(u) - 1;
                const float bm = sgs[(16 + g) * 32 + lane];
                const float th = bm - 2.0f * ev(bm);
                unsigned k0 = 0u, k1 = 0u;
                for (int c = 0; c < cpl; ++c) {
                    const int h = q + LPT * (g * cpl + c);
                    float x[8], bb[8];
                    row.chunk(h, x);
                    ds4_chunk_bias(sb, h, bb);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        if (ds4_screen<SF>(x[j]) + bb[j] >= th) {
                            const unsigned key = ds4_order_key(ds4_unbiased<SF>(x[j]) + bb[j]);
                            k1 = max(k1, min(k0, key));
                            k0 = max(k0, key);
                        }
                    }
                }
                sgs[(16 + g) * 32 + lane] = __uint_as_float(ds4_pair_group_key(k0, k1, pair, m));
            }
            // the uncertain groups compete for the places the sure ones leave (key, then group)
            const int need = group_topk - __popc(sure);
            kept = sure;
            for (unsigned u = unc; u; u &= u - 1u) {
                const int g = __ffs(u) - 1;
                const unsigned gk = __float_as_uint(sgs[(16 + g) * 32 + lane]);
                int r = 0;
                for (unsigned v = unc; v; v &= v - 1u) {
                    const int o = __ffs(v) - 1;
                    const unsigned ok = __float_as_uint(sgs[(16 + o) * 32 + lane]);
                    r += (ok > gk || (ok == gk && o < g)) ? 1 : 0;
                }
                if (r < need) kept |= 1u << g;
            }
            gsure = true;
        } else if (!gsure) {  // NaN / inf sums: the whole exact group pass
            bool finite;
            kept = ds4_rows_exact_groups<T, SF, LPT>(row, sb, sgs, lane, q, E, cpl, m, num_groups, group_topk, finite);
            gsure = finite;  // (else the exact path)
        }
        // tau from the kept groups' chunks only; the other chunks are never live
        int c = 0, g = 0;
#pragma unroll
        for (int hh = 0; hh < MAXC; ++hh) {
            if (hh < ncl) {
                const float lo = (kept >> g) & 1u ? up[hh] : DS4_NEG_INF;
                up[hh] = lo;
                ds4_insert_desc(tl, lo);
                if (++c == cpl) {
                    c = 0;
                    ++g;
                }
            }
        }
    }
    if constexpr (LPT == 2) {  // the KMAX largest bounds of both halves: a bitonic merge
        float c[KMAX];
#pragma unroll
        for (int j = 0; j < KMAX; ++j) c[j] = __shfl_xor_sync(0xffffffffu, tl[KMAX - 1 - j], 1);
#pragma unroll
        for (int j = 0; j < KMAX; ++j) c[j] = fmaxf(tl[j], c[j]);
#pragma unroll
        for (int d = KMAX / 2; d >= 1; d >>= 1) {
#pragma unroll
            for (int j = 0; j < KMAX; ++j) {
                if ((j & d) == 0) {
                    const float hi = fmaxf(c[j], c[j + d]);
                    c[j + d] = fminf(c[j], c[j + d]);
                    c[j] = hi;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < KMAX; ++j) tl[j] = c[j];
    }
    float tau = tl[0];  // tl[k - 1] (the list is sorted: a min, so no indexed register read)
#pragma unroll
    for (int j = 1; j < KMAX; ++j) tau = fminf(tau, j < k ? tl[j] : tl[0]);

    unsigned kk[KMAX];
    int ke[KMAX];
    float ku[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
        kk[j] = 0u;
        ke[j] = 0;
        ku[j] = 0.0f;
    }
    // (the same on both lanes of a token: tau is)
    bool exact_all = !(fabsf(tau) < __int_as_float(0x7f800000)) || !gsure;  // NaN / inf / near-tied groups
    if (!exact_all) {
        const float eps = ds4_screen_err<SF>(2.0f * fabsf(tau) + babs);
        const float lo_c = tau - 2.0f * eps;
        const float lo_h = plain ? tau - 4.0f * eps : lo_c;
        unsigned live = 0u;
#pragma unroll
        for (int hh = 0; hh < MAXC; ++hh)
            if (up[hh] >= lo_h) live |= 1u << hh;

        // 2. screen the live chunks' experts
        int n = 0;
        // one chunk ahead: the next live chunk's load is in flight while this one is screened
        int h = q + LPT * (live ? __ffs(live) - 1 : 0);
        uint4 cur[ROW::RAW];
        if (live) row.raw(h, cur);
        while (live) {
            live &= live - 1u;
            const int hn = live ? q + LPT * (__ffs(live) - 1) : h;
            uint4 nxt[ROW::RAW];
            row.raw(hn, nxt);
            float x[8];
            ROW::unpack(cur, x);
            float bb[8];
            ds4_chunk_bias(sb, h, bb);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (ds4_screen<SF>(x[j]) + bb[j] >= lo_c) {
                    if (n < CAP) {  // the logit goes along: step 3 reads no global memory
                        cand[n * 32 + lane] = (unsigned char)(8 * h + j);
                        candx[n * 32 + lane] = x[j];
                    }
                    ++n;
                }
            }
            h = hn;
#pragma unroll
            for (int i = 0; i < ROW::RAW; ++i) cur[i] = nxt[i];
        }
        int n_all = n;
        bool over = n > CAP;
        if constexpr (LPT == 2) {  // both lanes of the token are here (same tau)
            const unsigned pair = 3u << (lane & ~1);
            const int n_other = __shfl_xor_sync(pair, n, 1);
            n_all += n_other;
            over = over || n_other > CAP;
        }
        // 3. exact scores of the candidates
        if (!over && n_all >= k) {  // (fewer than k would break the error bound: never seen, but safe)
            for (int i = 0; i < n; ++i) {
                const int e = cand[i * 32 + lane];
                const float u = ds4_unbiased<SF>(candx[i * 32 + lane]);
                ds4_list_insert<KMAX>(kk, ke, ku, ds4_order_key(u + sb[e]), e, u);
            }
        } else {
            exact_all = true;
        }
    }

    if (exact_all) {  // every expert of this lane's part, exactly
        unsigned xkept = 0xffffffffu;
        if constexpr (GROUPED) {  // the exact group choice (both lanes of the token are here)
            bool finite;
            xkept = ds4_rows_exact_groups<T, SF, LPT>(row, sb, sgs, lane, q, E, cpl, m, num_groups, group_topk, finite);
        }
        int c = 0, g = 0;
#pragma unroll 1
        for (int h = q; h < E / 8; h += LPT) {
            float x[8];
            row.chunk(h, x);
            const bool in = !GROUPED || ((xkept >> g) & 1u);  // other groups' experts: -inf
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float u = ds4_unbiased<SF>(x[j]);
                ds4_list_insert<KMAX>(kk, ke, ku, ds4_order_key(in ? u + sb[8 * h + j] : DS4_NEG_INF), 8 * h + j, u);
            }
            if constexpr (GROUPED) {
                if (++c == cpl) {
                    c = 0;
                    ++g;
                }
            }
        }
    }
    if constexpr (LPT == 2) {  // merge the two halves' lists: bitonic, (key desc, expert asc)
        unsigned ck[KMAX];
        int ce[KMAX];
        float cu[KMAX];
#pragma unroll
        for (int j = 0; j < KMAX; ++j) {
            const unsigned ok = __shfl_xor_sync(0xffffffffu, kk[KMAX - 1 - j], 1);
            const int oe = __shfl_xor_sync(0xffffffffu, ke[KMAX - 1 - j], 1);
            const float ou = __shfl_xor_sync(0xffffffffu, ku[KMAX - 1 - j], 1);
            const bool mine = ds4_entry_before(kk[j], ke[j], ok, oe);
            ck[j] = mine ? kk[j] : ok;
            ce[j] = mine ? ke[j] : oe;
            cu[j] = mine ? ku[j] : ou;
        }
#pragma unroll
        for (int d = KMAX / 2; d >= 1; d >>= 1) {
#pragma unroll
            for (int j = 0; j < KMAX; ++j) {
                if ((j & d) == 0) {
                    const bool keep = ds4_entry_before(ck[j], ce[j], ck[j + d], ce[j + d]);
                    const unsigned k0 = ck[j], k1 = ck[j + d];
                    const int e0 = ce[j], e1 = ce[j + d];
                    const float u0 = cu[j], u1 = cu[j + d];
                    ck[j] = keep ? k0 : k1;
                    ck[j + d] = keep ? k1 : k0;
                    ce[j] = keep ? e0 : e1;
                    ce[j + d] = keep ? e1 : e0;
                    cu[j] = keep ? u0 : u1;
                    cu[j + d] = keep ? u1 : u0;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < KMAX; ++j) {
            kk[j] = ck[j];
            ke[j] = ce[j];
            ku[j] = cu[j];
        }
    }
    // weights, as the other kernels: unbiased scores of the winners, normalised when k > 1
    float tot = 0.0f;
#pragma unroll
    for (int j = 0; j < KMAX; ++j)
        if (j < k) tot += ku[j];
    const float dn = tot + 1e-20f;
    if (!valid) return;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
        if (j < k && j % LPT == q) {
            weights[token * w_rs + j * w_cs] = (k > 1 ? ku[j] / dn : ku[j]) * scaling;
            ds4_store_index(indices, idx_kind, token * i_rs + j * i_cs, ke[j]);
        }
    }
}

// One tile of 32 / LPT tokens per warp, rows read from global memory.
template <typename T, int SF, int KMAX, int LPT, bool GROUPED>
__device__ __forceinline__ void
ds4_rows_topk(const T* __restrict__ logits, const float* __restrict__ bias, long long num_tokens, int E, int k,
              float scaling, float* __restrict__ weights, long long w_rs, long long w_cs,
              void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind, int num_groups,
              int group_topk) {
    constexpr int CAP = ds4_rows_cap<KMAX, GROUPED>();
    constexpr int TPW = 32 / LPT;                    // tokens per warp
    extern __shared__ __align__(16) unsigned char smem[];
    // layout: candidates' logits [W][CAP][32] | their experts [W][CAP][32] (bytes) | bias [256] | max |bias|
    const int lane = threadIdx.x & 31;
    const int wib = threadIdx.x >> 5;
    float* candx = reinterpret_cast<float*>(smem) + wib * CAP * 32;
    unsigned char* cand = smem + DS4_ROWS_WARPS * CAP * 32 * 4 + wib * CAP * 32;
    float* sb = reinterpret_cast<float*>(smem + DS4_ROWS_WARPS * CAP * 32 * 5);
    unsigned* sbabs = reinterpret_cast<unsigned*>(sb + 256);
    const long long tile0 = ((long long)blockIdx.x * DS4_ROWS_WARPS + wib) * TPW;
    const int rows = (int)max(0LL, min((long long)TPW, num_tokens - tile0));
    ds4_rows_bias_table(bias, E, sb, sbabs, 32 * DS4_ROWS_WARPS);
    if (rows == 0) return;  // the whole warp (no block-wide barriers below)
    const int t = lane / LPT;  // token of this lane in the tile
    const bool valid = t < rows;  // lanes past the last token redo it and write nothing (shuffles)
    const long long token = tile0 + min(t, rows - 1);
    Ds4Row<T> row;
    row.p = logits + token * E;
    ds4_rows_tile<T, SF, KMAX, LPT, GROUPED>(row, token, valid, candx, cand, sb, __uint_as_float(*sbabs),
                                                       bias != nullptr, E, k, scaling, weights, w_rs, w_cs, indices,
                                                       i_rs, i_cs, idx_kind, num_groups, group_topk);
}
