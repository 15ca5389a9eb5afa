// locality_accumulate<W> — the second of the locality recorder's two launches
// (locality_common.cuh): every access's LRU stack distance, the per-expert and per-distance
// counters, and the adjacency of consecutive records.
//
// Thread layout: blocks of 256 threads (GP = 8 warps, one part each).  The block finds every
// expert's latest access before its first part (walking back over bmax, then the parts of the
// block found; else the pre-call rank; else never) and ranks them (warp-sorted runs of 32, binary
// searches: the LRU stack at the block's start, "cold" = E for never accessed).  Warp w brings
// that stack past the block's parts before its own in one move (pcum: the experts accessed there
// take their rank, every other expert moves down by those that were below it): its stack at the
// part's start.  It then walks its part 32 keys at a time, one access per lane:
//   * an earlier lane holds e (match): the distinct experts in the lanes between, i.e. those
//     lanes that are not an earlier lane's previous access (a prefix OR of "previous" bits);
//   * else e's rank at the sub-segment's start, plus the first accesses of earlier lanes whose
//     rank there is larger (a compare over the ranks' bits by ballots); E if e is cold.  That
//     rank comes from the part's own state, so the stack itself never moves: if e was accessed
//     in the part, the marks after its last key there (a bitmap over the part's keys marking each
//     expert's last access, with suffix counts per word); else its rank at the part's start,
//     moved down by the D experts accessed in the part so far, less those of them that were
//     below it (a bitmap over start ranks, with prefix counts).  After each 32 keys: the marks of
//     the experts accessed move to their last lane, the start ranks of the experts new to the
//     part go into the rank bitmap, and both counts are redone (one word per lane).
// Then one lane per record for the adjacency with the previous record of its sequence
// (adjacency.cuh).  Counters gather in shared memory and go out with one global atomic per
// non-zero bin: integers (exact, order-free) and weight sums (32.32 fixed point in a block, exact
// there; weights below 2^-9 or from 2^12 in size, and non-finite ones, go to the float64 sums
// directly): equal to float64 sums up to rounding order.
//
// Bytes per layer and step: the int16 ids prepare wrote (2 bytes per slot, from L2), the weights
// once, per part 4 E bytes of pcum and per block 4 E of bmax read back from L2, a few counters.
#include "../common/common.cuh"
#include "locality_common.cuh"
#include "adjacency.cuh"

// Moves a warp's LRU stack (ranks by expert in `rk`, E = cold) past a set of accessed experts:
// `vw` holds a bit at the old rank of each accessed expert that was not cold, `cold` counts the
// cold ones.  Every expert not cold moves down by the accessed experts below it (the accessed
// ones take their new ranks afterwards, from the caller).  Word w of the bitmap and the bits in
// the words after it live in lane w.
template <int W>
__device__ __forceinline__ void ds4_stack_shift(int* rk, const unsigned* vw, int cold, int E, int lane) {
    __syncwarp();
    const unsigned word = lane < W ? vw[lane] : 0u;
    const int c = __popc(word);
    int after = c;  // inclusive suffix sum over lanes
#pragma unroll
    for (int off = 1; off < W; off <<= 1) {
        const int u = __shfl_down_sync(0xffffffffu, after, off);
        if (lane + off < 32) after += u;
    }
    after += cold - c;
#pragma unroll
    for (int i = 0; i < W; ++i) {
        const int f = lane + 32 * i;
        const int o = f < E ? rk[f] : E;
        const int src = (o >> 5) & (W - 1);
        const int n = __shfl_sync(0xffffffffu, after, src);
        const unsigned wv = __shfl_sync(0xffffffffu, word, src);
        if (o < E) rk[f] = o + n + __popc((wv >> (o & 31)) >> 1);
    }
    __syncwarp();
}

// A block's weight sum in 32.32 fixed point, as two words of shared memory: lo[b] += v with the
// carry into hi[b].  Weights with 2^-9 <= |w| < 2^12 are exact multiples of 2^-32, so the sums are
// exact and order-free (at most 2^18 of them a block: |sum| < 2^62).
__device__ __forceinline__ void ds4_fixed_add(unsigned* lo, unsigned* hi, int b, long long v) {
    const unsigned l = (unsigned)v;
    const unsigned old = atomicAdd(&lo[b], l);
    const unsigned h = (unsigned)((unsigned long long)v >> 32) + (old + l < old ? 1u : 0u);
    if (h) atomicAdd(&hi[b], h);
}

__device__ __forceinline__ double ds4_fixed_value(const unsigned* lo, const unsigned* hi, int b) {
    const long long v = (long long)(((unsigned long long)hi[b] << 32) | lo[b]);
    return (double)v * 2.3283064365386963e-10;  // 2^-32
}

// Shared memory of one locality_accumulate block (the recorder's _accumulate_smem mirrors it):
// counters (fixed-point weight sums, integer bins, adjacency), the block's start orders [32 ceil(E / 32)]
// (then sorted runs) and ranks [E],
// then per warp: its stack at the part's start [E] (ranks), each expert's last key in the part [E]
// (-1: not yet), the part's last-access marks [NM] and their suffix counts [NM + 1] (NM = words of
// the part's keys), the bitmap over start ranks of the experts accessed in the part [W] and its
// prefix counts [W], and, with `stage`, its part's ids [P k] (int16, -1 invalid) for the adjacency.
struct Ds4AccLayout {
    int wsum, wdist, hist, dist, adj, ord, rank0, stack, ts, marks, suf, vw, pre, st, total;
};

__host__ __device__ __forceinline__ Ds4AccLayout ds4_acc_layout(int E, int W, int adj_len, int part_keys,
                                                                int stage_keys) {
    const int nm = (part_keys + 31) / 32;
    Ds4AccLayout o;
    o.wsum = 0;
    o.wdist = o.wsum + (int)ds4_align16(8LL * E);
    o.hist = o.wdist + (int)ds4_align16(8LL * (E + 1));
    o.dist = o.hist + (int)ds4_align16(4LL * E);
    o.adj = o.dist + (int)ds4_align16(4LL * (E + 1));
    o.ord = o.adj + (int)ds4_align16(4LL * adj_len);
    o.rank0 = o.ord + (int)ds4_align16(4LL * 32 * ((E + 31) / 32));
    o.stack = o.rank0 + (int)ds4_align16(4LL * E);
    o.ts = o.stack + DS4_LOC_GP * (int)ds4_align16(4LL * E);
    o.marks = o.ts + DS4_LOC_GP * (int)ds4_align16(4LL * E);
    o.suf = o.marks + DS4_LOC_GP * (int)ds4_align16(4LL * nm);
    o.vw = o.suf + DS4_LOC_GP * (int)ds4_align16(4LL * (nm + 1));
    o.pre = o.vw + DS4_LOC_GP * (int)ds4_align16(4LL * W);
    o.st = o.pre + DS4_LOC_GP * (int)ds4_align16(4LL * W);
    o.total = o.st + DS4_LOC_GP * (int)ds4_align16(2LL * stage_keys);
    return o;
}
template <int W>
__global__ void __launch_bounds__(256, 3)
locality_accumulate(const float* __restrict__ weights, long long w_rs, long long w_cs, long long w_ls, long long T,
                    int k, int E, const void* __restrict__ pos, int pos64, long long pos_base,
                    const void* __restrict__ seq, int seq64, long long num_seqs, long long clock,
                    long long* __restrict__ last, int parity, int* __restrict__ pcum, int* __restrict__ bmax,
                    int* __restrict__ rank, long long* __restrict__ snap_pos, int* __restrict__ snap_ids,
                    long long* __restrict__ prev_pos, int* __restrict__ prev_ids,
                    unsigned long long* __restrict__ hist, double* __restrict__ wsum,
                    unsigned long long* __restrict__ dist, double* __restrict__ wdist,
                    unsigned long long* __restrict__ adj, int adj_len, int layer0, int P, int NP, int NB,
                    int stage, const short* __restrict__ cids) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int NBITS = W == 1 ? 6 : W == 2 ? 7 : W == 4 ? 8 : W == 8 ? 9 : 10;  // ranks 0 .. 32 W
    const Ds4AccLayout o = ds4_acc_layout(E, W, adj_len, P * k, stage ? P * k : 0);
    // weight sums in 32.32 fixed point, low and high words (native 32-bit shared atomics)
    unsigned* s_wsum = reinterpret_cast<unsigned*>(smem + o.wsum);  // [2][E]
    unsigned* s_wdist = reinterpret_cast<unsigned*>(smem + o.wdist);  // [2][E + 1]
    unsigned* s_hist = reinterpret_cast<unsigned*>(smem + o.hist);
    unsigned* s_dist = reinterpret_cast<unsigned*>(smem + o.dist);
    unsigned* s_adj = reinterpret_cast<unsigned*>(smem + o.adj);
    unsigned* s_ord = reinterpret_cast<unsigned*>(smem + o.ord);
    int* s_rank0 = reinterpret_cast<int*>(smem + o.rank0);

    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    const long long li = blockIdx.y, layer = layer0 + li;
    const int b = blockIdx.x, q0 = b * DS4_LOC_GP;
    if (weights != nullptr) weights += li * w_ls;
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer(li, layer, E, k, NP, NB, T, num_seqs, last, parity, last_cur, last_next, pcum, bmax, rank,
                 snap_pos, snap_ids, prev_pos, prev_ids);
    hist += layer * E;
    wsum += layer * E;
    dist += layer * (E + 1);
    wdist += layer * (E + 1);
    adj += layer * adj_len;
    int* rk = reinterpret_cast<int*>(smem + o.stack + warp * (int)ds4_align16(4LL * E));  // this warp's stack
    unsigned* vw = reinterpret_cast<unsigned*>(smem + o.vw + warp * (int)ds4_align16(4LL * W));
    const int nm = (P * k + 31) / 32;
    int* ts = reinterpret_cast<int*>(smem + o.ts + warp * (int)ds4_align16(4LL * E));
    unsigned* marks = reinterpret_cast<unsigned*>(smem + o.marks + warp * (int)ds4_align16(4LL * nm));
    int* suf = reinterpret_cast<int*>(smem + o.suf + warp * (int)ds4_align16(4LL * (nm + 1)));
    int* pre = reinterpret_cast<int*>(smem + o.pre + warp * (int)ds4_align16(4LL * W));
    short* st = stage ? reinterpret_cast<short*>(smem + o.st + warp * (int)ds4_align16(2LL * P * k)) : nullptr;

    for (int e = tid; e < E; e += nt) {
        s_wsum[e] = s_wsum[E + e] = 0u;
        s_hist[e] = 0u;
    }
    for (int d = tid; d <= E; d += nt) {
        s_wdist[d] = s_wdist[E + 1 + d] = 0u;
        s_dist[d] = 0u;
    }
    for (int t = tid; t < adj_len; t += nt) s_adj[t] = 0u;
    // this warp's part, and its first 32 keys' and its catch-up ranks' loads in flight during the
    // block-start work below (measured: -5% at T=4096, -10% at T=64);
    // each lane's key moves by 32 = di records + dj slots per step
    const int q = q0 + warp;
    const long long r0 = (long long)q * P;
    const int nrec = q < NP ? (int)min((long long)P, T - r0) : 0;
    const int nkeys = nrec * k;
    const float rkp = 1.0f / (float)k;
    const int di = 32 / k, dj = 32 - di * k;
    const long long wbase = r0 * w_rs;
    int ci = ds4_div(lane, k, rkp), cj = lane - ci * k;  // the lane's record (in the part) and slot
    const short* cpart = cids + li * T * k + r0 * k;  // the part's ids as the first kernel wrote them (-1 invalid)
    int e_n = lane < nkeys ? cpart[lane] : -1;
    float w_n = (e_n >= 0 && weights != nullptr) ? weights[wbase + ci * w_rs + cj * w_cs] : 0.0f;
    int pc[W];  // the ranks after the block's parts before this one (for the catch-up move), loaded early too
#pragma unroll
    for (int i = 0; i < W; ++i)
        pc[i] = (q < NP && warp > 0 && lane + 32 * i < E) ? pcum[(long long)(q - 1) * E + lane + 32 * i] : -1;
    // each expert's latest access before the block, as one order: 0 never, 1 .. E before the call
    // (E - rank), E + 1 + key in the call (keys < 2^31 - E: checked by the host).  Its rank is the
    // experts with a larger order: each warp sorts the orders of its 32 experts (descending, a
    // bitonic network over the lanes) into a run in shared memory, and every expert counts the
    // larger orders of each run by a binary search (orders other than "never" are distinct).
    const int nruns = (E + 31) >> 5;  // runs of 32 experts (padded with "never")
    unsigned ofv[2];  // the orders of this thread's experts tid and tid + 256 (E <= 512)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int f = tid + nt * i;
        ofv[i] = 0u;
        if (f < 32 * nruns) {  // warp-uniform
            unsigned ord = 0u;
            if (f < E) {
                int key = -1;
                for (int bb = b - 1; bb >= 0; bb -= 4) {  // the latest earlier block holding f, 4 a round
                    int m[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u) m[u] = bb - u >= 0 ? bmax[(long long)(bb - u) * E + f] : -1;
#pragma unroll
                    for (int u = 3; u >= 0; --u)
                        if (m[u] >= 0) key = m[u];  // ends at the latest (smallest u)
                    if (key >= 0) break;
                }
                if (key >= 0) ord = (unsigned)E + 1u + (unsigned)key;
                else if (last_cur[f] >= 0) ord = (unsigned)(E - rank[f]);
            }
            ofv[i] = ord;
            unsigned v = ord;
#pragma unroll
            for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
                for (int stride = size >> 1; stride > 0; stride >>= 1) {
                    const unsigned o = __shfl_xor_sync(0xffffffffu, v, stride);
                    const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0);
                    v = keep_max ? max(v, o) : min(v, o);
                }
            }
            s_ord[f] = v;  // run f / 32, position lane (largest first)
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int f = tid + nt * i;
        if (f < E) {
            const unsigned of = ofv[i];
            int n = E;
            if (of != 0u) {
                n = 0;
                for (int r = 0; r < nruns; ++r) {  // the orders above `of` in run r: a prefix of it
                    const unsigned* run = s_ord + 32 * r;
                    int pos = 0;
#pragma unroll
                    for (int step = 16; step > 0; step >>= 1)
                        if (run[pos + step - 1] > of) pos += step;
                    n += pos + (run[pos] > of ? 1 : 0);
                }
            }
            s_rank0[f] = n;
        }
    }
    __syncthreads();

    if (q < NP) {
#pragma unroll
        for (int i = 0; i < W; ++i)
            if (lane + 32 * i < E) rk[lane + 32 * i] = s_rank0[lane + 32 * i];
        if (warp > 0) {  // the stack past the block's parts before this one, in one move
            if (lane < W) vw[lane] = 0u;
            __syncwarp();
            int cold = 0;
#pragma unroll
            for (int i = 0; i < W; ++i) {
                const int f = lane + 32 * i;
                if (pc[i] >= 0) {
                    const int of = rk[f];
                    if (of < E) atomicOr(&vw[of >> 5], 1u << (of & 31));
                    else ++cold;
                }
            }
            cold = __reduce_add_sync(0xffffffffu, cold);
            ds4_stack_shift<W>(rk, vw, cold, E, lane);
#pragma unroll
            for (int i = 0; i < W; ++i)
                if (pc[i] >= 0) rk[lane + 32 * i] = pc[i];
            __syncwarp();
        }
        // nothing of the part accessed yet
#pragma unroll
        for (int i = 0; i < W; ++i)
            if (lane + 32 * i < E) ts[lane + 32 * i] = -1;
        if (lane < W) {
            vw[lane] = 0u;
            pre[lane] = 0;
        }
        int D = 0;
        __syncwarp();
        // the part, 32 keys at a time
        const unsigned lt = (1u << lane) - 1u, gt = ~((2u << lane) - 1u);
        for (int base = 0; base < nkeys; base += 32) {
            const int e = e_n;
            const float wt = w_n;
            ci += di;
            cj += dj;
            if (cj >= k) {
                cj -= k;
                ++ci;
            }
            if (base + 32 + lane < nkeys) {  // the next 32 keys' loads in flight
                e_n = cpart[base + 32 + lane];
                w_n = (e_n >= 0 && weights != nullptr) ? weights[wbase + ci * w_rs + cj * w_cs] : 0.0f;
            } else {
                e_n = -1;
            }
            const bool valid = e >= 0;
            if (st != nullptr && base + lane < nkeys) st[base + lane] = (short)e;
            const unsigned vmask = __ballot_sync(0xffffffffu, valid);
            const unsigned m = __match_any_sync(0xffffffffu, valid ? e : E + lane) & vmask;
            const unsigned pm = m & lt;
            const int p = pm ? 31 - __clz(pm) : -1;  // the previous lane holding e
            const bool first = valid && pm == 0u, lastl = valid && (m & gt) == 0u;
            // lanes that are an earlier lane's previous access: not distinct since then
            unsigned x = (valid && p >= 0) ? 1u << p : 0u;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned y = __shfl_up_sync(0xffffffffu, x, off);
                if (lane >= off) x |= y;
            }
            // e's rank at the sub-segment's start: from the part's marks if e was accessed in the part
            // (the experts whose last access is later), else from its rank at the part's start (moved
            // down by the D experts accessed in the part, less those of them that were below it)
            int ro = 0, tsv = -1, rov = E;
            if (first) {
                tsv = ts[e];
                if (tsv >= 0) {
                    ro = suf[(tsv >> 5) + 1] + __popc((marks[tsv >> 5] >> (tsv & 31)) >> 1);
                } else {
                    rov = rk[e];
                    ro = rov >= E ? E
                                  : D + rov - pre[rov >> 5] - __popc(vw[rov >> 5] & ((1u << (rov & 31)) - 1u));
                }
            }
            const unsigned fmask = __ballot_sync(0xffffffffu, first);
            // first accesses of earlier lanes with a larger rank: a compare over the bits, top one first
            unsigned eqm = fmask & lt, gtm = 0u, rs = (unsigned)ro << (32 - NBITS);
#pragma unroll
            for (int bit = 0; bit < NBITS; ++bit) {
                const unsigned mine = (unsigned)((int)rs >> 31);  // all ones where ro has the bit
                const unsigned ones = __ballot_sync(0xffffffffu, (int)rs < 0);
                rs <<= 1;
                gtm |= eqm & ones & ~mine;
                eqm &= ~(ones ^ mine);
            }
            int d;
            if (p >= 0) d = __popc(vmask & lt & ~((2u << p) - 1u) & ~x);
            else d = ro >= E ? E : ro + __popc(gtm);
            if (valid) {
                atomicAdd(&s_hist[e], 1u);
                atomicAdd(&s_dist[d], 1u);
                const float aw = fabsf(wt);
                if (aw >= 0.001953125f && aw < 4096.0f) {  // 2^-9 <= |w| < 2^12: a multiple of 2^-32
                    const long long v = (long long)(wt * 4294967296.0f);  // exact
                    ds4_fixed_add(s_wsum, s_wsum + E, e, v);
                    ds4_fixed_add(s_wdist, s_wdist + E + 1, d, v);
                } else if (weights != nullptr && wt != 0.0f) {  // tiny, large or not finite: float64 in L2
                    atomicAdd(&wsum[e], (double)wt);
                    atomicAdd(&wdist[d], (double)wt);
                }
            }
            if (base + 32 < nkeys) {  // the part's marks and rank bitmap past these 32 keys
                if (first) {
                    if (tsv >= 0) atomicAnd(&marks[tsv >> 5], ~(1u << (tsv & 31)));  // no longer e's last
                    else if (rov < E) atomicOr(&vw[rov >> 5], 1u << (rov & 31));  // e's first access in the part
                }
                const unsigned lmask = __ballot_sync(0xffffffffu, lastl);
                const int s = base >> 5;
                if (lane == 0) marks[s] = lmask;
                if (lastl) ts[e] = base + lane;
                __syncwarp();
                D = ds4_suffix_counts(marks, s + 1, suf, lane, true);  // D: distinct experts of the part so far
                if (lane == 0) suf[s + 1] = 0;
                const int v = lane < W ? __popc(vw[lane]) : 0;  // prefix counts of the rank bitmap
                int incl = v;
#pragma unroll
                for (int off = 1; off < W; off <<= 1) {
                    const int u = __shfl_up_sync(0xffffffffu, incl, off);
                    if (lane >= off) incl += u;
                }
                if (lane < W) pre[lane] = incl - v;
                __syncwarp();
            }
        }
        // one lane per record: adjacency
        __syncwarp();
        for (int i = lane; i < nrec; i += 32)
            ds4_adjacency(cids + li * T * k, T, k, E, pos, pos64, pos_base, seq, seq64, num_seqs,
                          snap_pos, snap_ids, prev_pos, prev_ids, s_adj, r0 + i, st, r0);
    }
    __syncthreads();

    // the block's counters into the layer's
    for (int e = tid; e < E; e += nt) {
        if (s_hist[e]) {
            atomicAdd(&hist[e], (unsigned long long)s_hist[e]);
            if (weights != nullptr) atomicAdd(&wsum[e], ds4_fixed_value(s_wsum, s_wsum + E, e));
        }
        const int key = bmax[(long long)b * E + e];
        if (key >= 0) atomicMax(&last_next[e], clock + key);
    }
    for (int d = tid; d <= E; d += nt)
        if (s_dist[d]) {
            atomicAdd(&dist[d], (unsigned long long)s_dist[d]);
            if (weights != nullptr) atomicAdd(&wdist[d], ds4_fixed_value(s_wdist, s_wdist + E + 1, d));
        }
    for (int t = tid; t < adj_len; t += nt)
        if (s_adj[t]) atomicAdd(&adj[t], (unsigned long long)s_adj[t]);
}
