// locality.cu — online expert-locality recording (issue: locality profiler): two launches per
// call, no host synchronisation.  A call covers one layer or several layers of one step (grid y =
// the layer within the call: its ids / weights at i_ls / w_ls elements apart, its scratch rows;
// layer0 + y = the recorder's layer, whose state and counters it updates).
//
// An access is (record r, slot j) with a valid id; its key r * k + j orders the call's accesses.
// The LRU stack distance of an access to e is the number of distinct experts accessed since the
// previous access to e (E if e was never accessed): e's rank in the LRU stack, 0 = most recent.
// The call's records are cut into parts of P records, GP = 8 consecutive parts per block (one warp
// each); E <= 32 W.
//
// locality_prepare<W>: per block of parts b, bmax[b][f] = the key of f's last access in it (-1 if
// none); per part q, pcum[q][f] = the rank f has right after the block's parts up to q if it is in
// them (the distinct experts whose last access there is later), else -1.  Warp w reads part w's
// ids (kept in shared memory when they fit, and written out as int16 for the second kernel: -1
// invalid) into its row of last keys; then, for a batch of prefixes at a time, prefix q's bitmap
// over the block's keys marks each expert's last key in parts 0 .. q (built word by word with
// ballots: a key that is its expert's last in its part and whose expert no later part up to q
// accesses), and a rank is the marks after the expert's key (suffix popcounts per word).  First records of a run of one sequence snapshot that sequence's
// previous record (position, ids) before the second kernel overwrites it.  One extra block per
// layer ranks the experts by their last access before this call and carries `last` into the next
// call's buffer.
//
// locality_accumulate<W>: the block finds every expert's latest access before its first part
// (walking back over bmax, then the parts of the block found; else the pre-call rank; else never)
// and ranks them (warp-sorted runs of 32, binary searches: the LRU stack at the block's start,
// "cold" = E for never accessed).  Warp w brings that stack past the block's parts before its own
// in one move (pcum: the experts accessed there take their rank, every other expert moves down by
// those that were below it): its stack at the part's start.  It then walks its part 32 keys at a time, one access per lane:
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
// Then one lane per record for the adjacency with the previous record of its sequence.  Counters
// gather in shared memory and go out with one global atomic per non-zero bin: integers (exact,
// order-free) and weight sums (32.32 fixed point in a block, exact there; weights below 2^-9 or
// from 2^12 in size, and non-finite ones, go to the float64 sums directly): equal to float64
// sums up to rounding order.
//
// Bytes per layer and step: the ids read once (by prepare, which writes them as int16 for itself
// and for accumulate: 2 bytes per slot written and read back from L2), the weights once, per part
// 4 E bytes of pcum (and per block 4 E of bmax) written and read back from L2, a few counters.
#include "common.cuh"

#define DS4_LOC_GP 8  // parts per block (warps)
#ifndef DS4_LOC_PREP_U
#define DS4_LOC_PREP_U 4  // prepare: 32-slot steps of a part whose loads are in flight together
#endif

// t / k for 0 <= t < 2^22, rk = 1/k: (t + 1/2) / k lies at least 1/(2k) from an integer, and the
// two float roundings err by less than (t + 1/2) / k * 2^-23, below that while t < 2^22 (an
// integer division is ~20 instructions)
__device__ __forceinline__ int ds4_div(int t, int k, float rk) {
    return (int)(((float)t + 0.5f) * rk);
}

// The expert of slot `off`, or -1 where the id is not in [0, E) (int64 ids compared whole).
__device__ __forceinline__ int ds4_load_expert(const void* ids, int kind, long long off, int E) {
    long long v;
    switch (kind) {
        case DS4_IDX_U8: v = static_cast<const unsigned char*>(ids)[off]; break;
        case DS4_IDX_U16: v = static_cast<const unsigned short*>(ids)[off]; break;
        case DS4_IDX_I16: v = static_cast<const short*>(ids)[off]; break;
        case DS4_IDX_I32: v = static_cast<const int*>(ids)[off]; break;
        default: v = static_cast<const long long*>(ids)[off];
    }
    return (v >= 0 && v < E) ? (int)v : -1;
}

__device__ __forceinline__ long long ds4_seq_of(const void* seq, int seq64, long long r) {
    if (seq == nullptr) return 0;
    return seq64 ? static_cast<const long long*>(seq)[r] : (long long)static_cast<const int*>(seq)[r];
}

__device__ __forceinline__ long long ds4_pos_of(const void* pos, int pos64, long long base, long long r) {
    if (pos == nullptr) return base + r;
    return pos64 ? static_cast<const long long*>(pos)[r] : (long long)static_cast<const int*>(pos)[r];
}

__host__ __device__ __forceinline__ long long ds4_align16(long long bytes) { return (bytes + 15) & ~15LL; }

// Moves the per-layer pointers to this block's layer: li = the layer within the call (scratch),
// layer = the recorder's layer (its state).  Both kernels, one layout.
template <typename PR, typename BM, typename RK, typename SP, typename SI, typename PP, typename PI>
__device__ __forceinline__ void ds4_to_layer(long long li, long long layer, int E, int k, int NP, int NB, long long T,
                                             long long num_seqs, long long* last, int parity,
                                             const long long*& last_cur, long long*& last_next, PR& pcum,
                                             BM& bmax, RK& rank, SP& snap_pos, SI& snap_ids, PP& prev_pos,
                                             PI& prev_ids) {
    last_cur = last + layer * 2 * E + parity * E;  // `last` double-buffered: read one, write the other
    last_next = last + layer * 2 * E + (1 - parity) * E;
    pcum += li * NP * E;
    bmax += li * NB * E;
    rank += layer * E;
    snap_pos += li * T;
    snap_ids += li * T * k;
    prev_pos += layer * num_seqs;
    prev_ids += layer * num_seqs * k;
}

// Suffix counts of the bitmap words bm[0 .. n - 1] by one warp: out[w] = the bits set in words
// w + 1 .. n - 1, or in w .. n - 1 with `inclusive`; returns the bits set in all n words.
__device__ __forceinline__ int ds4_suffix_counts(const unsigned* bm, int n, int* out, int lane, bool inclusive) {
    int carry = 0;
    for (int base = (n - 1) & ~31; base >= 0; base -= 32) {
        const int w = base + lane;
        const int v = w < n ? __popc(bm[w]) : 0;
        int incl = v;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int u = __shfl_down_sync(0xffffffffu, incl, off);
            if (lane + off < 32) incl += u;
        }
        if (w < n) out[w] = (inclusive ? incl : incl - v) + carry;
        carry += __shfl_sync(0xffffffffu, incl, 0);
    }
    return carry;
}

template <int W>
__global__ void __launch_bounds__(256, 4)
locality_prepare(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls, long long T,
                 int k, int E, const void* __restrict__ seq, int seq64, long long num_seqs,
                 long long* __restrict__ prev_pos, int* __restrict__ prev_ids, long long* __restrict__ last,
                 int parity, int P, int NP, int NB, int* __restrict__ pcum, int* __restrict__ bmax,
                 int* __restrict__ rank, long long* __restrict__ snap_pos, int* __restrict__ snap_ids, int layer0,
                 int nbp, int stage, short* __restrict__ cids) {
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long ioff = li * i_ls;  // ids of this layer
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer(li, layer, E, k, NP, NB, T, num_seqs, last, parity, last_cur, last_next, pcum, bmax, rank,
                 snap_pos, snap_ids, prev_pos, prev_ids);
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    if ((int)blockIdx.x == NB) {
        // the ranks by last access before this call (0 = most recent; accessed experts have
        // distinct times), and `last` carried into the next buffer
        __shared__ long long sl[512];
        for (int e = tid; e < 512; e += nt) {
            sl[e] = e < E ? last_cur[e] : -1;
            if (e < E) last_next[e] = sl[e];
        }
        __syncthreads();
        for (int e = tid; e < E; e += nt) {
            const long long le = sl[e];
            int n0 = 0, n1 = 0, n2 = 0, n3 = 0;  // independent sums: loads in flight
            for (int f = 0; f < E; f += 4) {
                n0 += sl[f] > le;
                n1 += sl[f + 1] > le;
                n2 += sl[f + 2] > le;
                n3 += sl[f + 3] > le;
            }
            rank[e] = n0 + n1 + n2 + n3;
        }
        return;
    }
    extern __shared__ __align__(16) unsigned char smem[];
    const int b = blockIdx.x, q0 = b * DS4_LOC_GP, nparts = min(DS4_LOC_GP, NP - q0);
    const long long r0 = (long long)q0 * P;
    const int nrec = (int)min((long long)nparts * P, T - r0);
    const int Pk = P * k, nkb = nrec * k;  // slots per part, slots of the block
    const int nwb = (int)(((long long)DS4_LOC_GP * Pk + 31) / 32);
    const int K0 = (int)(r0 * k);  // the block's first key
    // shared memory (ds4kern.recorder._prepare_smem mirrors it): per part last keys [GP][E], per
    // part the next part accessing each expert [GP][E] (bytes), the prefix bitmaps of one batch of
    // `nbp` prefixes over the block's keys [nbp][nwb] and their suffix counts [nbp][nwb], and with
    // `stage` the block's ids [GP P k] (int16, -1 invalid)
    int* s_last = reinterpret_cast<int*>(smem);  // [GP][E]
    unsigned char* s_np = smem + ds4_align16(4LL * DS4_LOC_GP * E);  // [GP][E]
    unsigned* s_bm = reinterpret_cast<unsigned*>(s_np + ds4_align16(1LL * DS4_LOC_GP * E));  // [nbp][nwb]
    int* s_sfx = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_bm) + ds4_align16(4LL * nbp * nwb));
    short* st = stage ? reinterpret_cast<short*>(reinterpret_cast<unsigned char*>(s_sfx) + ds4_align16(4LL * nbp * nwb))
                      : nullptr;
    for (int t = tid; t < DS4_LOC_GP * E / 4; t += nt)  // (GP E is a multiple of 4: 16-byte stores)
        reinterpret_cast<int4*>(s_last)[t] = make_int4(-1, -1, -1, -1);
    __syncthreads();
    if (warp < nparts) {  // warp w: its part's last keys, 32 slots a step, DS4_LOC_PREP_U steps' loads in flight
        const int rw = warp * P;  // the part's first record in the block
        const int nk = min(P, nrec - rw) * k, kb = rw * k;
        int* row = s_last + warp * E;
        const int di = 32 / k, dj = 32 - di * k;
        int ci = ds4_div(lane, k, 1.0f / (float)k), cj = lane - ci * k;  // the lane's record (in the part), slot
        const long long pbase = ioff + (r0 + rw) * i_rs;
        for (int base = lane; base < nk; base += 32 * DS4_LOC_PREP_U) {
            int e[DS4_LOC_PREP_U];
#pragma unroll
            for (int u = 0; u < DS4_LOC_PREP_U; ++u) {
                e[u] = base + 32 * u < nk ? ds4_load_expert(ids, idx_kind, pbase + ci * i_rs + cj * i_cs, E) : -1;
                ci += di;
                cj += dj;
                if (cj >= k) {
                    cj -= k;
                    ++ci;
                }
            }
#pragma unroll
            for (int u = 0; u < DS4_LOC_PREP_U; ++u) {
                if (e[u] >= 0) atomicMax(&row[e[u]], K0 + kb + base + 32 * u);
                if (base + 32 * u < nk) {
                    if (st != nullptr) st[kb + base + 32 * u] = (short)e[u];
                    cids[li * T * k + K0 + kb + base + 32 * u] = (short)e[u];  // for the second kernel
                }
            }
        }
    }
    for (int i = tid; i < nrec; i += nt) {  // snapshots for the first record of a run of several
        const long long r = r0 + i;
        const long long sq = ds4_seq_of(seq, seq64, r);
        if (sq < 0 || sq >= num_seqs) continue;
        const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
        const bool alone = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
        if (first && !alone) {
            snap_pos[r] = prev_pos[sq];
            for (int s = 0; s < k; ++s) snap_ids[r * k + s] = prev_ids[sq * k + s];
        }
    }
    __syncthreads();
    for (int f = tid; f < E; f += nt) {  // the block's last keys; per part the next part accessing f
        int m = -1, nxt = DS4_LOC_GP;
        for (int p = nparts - 1; p >= 0; --p) {
            const int key = s_last[p * E + f];
            s_np[p * E + f] = (unsigned char)nxt;
            if (key >= 0) nxt = p;
            m = max(m, key);
        }
        bmax[(long long)b * E + f] = m;
    }
    __syncthreads();
    // pcum, nbp prefixes at a time: prefix p's bitmap over the block's keys holds, for every expert
    // accessed in parts 0 .. p, its last key there (a key of part q <= p that is its expert's last
    // in q and whose expert no part in q + 1 .. p accesses: built by ballots, no atomics); a rank is
    // then the bits after the expert's key (suffix counts per word)
    const float rpk = 1.0f / (float)Pk;
    for (int p0 = 0; p0 + 1 < nparts; p0 += nbp) {  // block-uniform; the last part's ranks are not needed
        const int np = min(nbp, nparts - 1 - p0);
        const int nw = ((p0 + np) * Pk + 31) / 32;  // words holding the keys of parts 0 .. p0 + np - 1
        for (int w = warp; w < nw; w += DS4_LOC_GP) {
            const int x = 32 * w + lane;  // the block's key K0 + x
            unsigned iv = 0u;  // the prefixes p0 + jj marking this key: bit jj
            if (x < nkb) {
                // the key's id as written above (this block's own global writes: visible after the barrier)
                const int e = st != nullptr ? st[x] : cids[li * T * k + K0 + x];
                if (e >= 0) {
                    const int q = ds4_div(x, Pk, rpk);  // x / Pk (x < 2^18)
                    if (s_last[q * E + e] == K0 + x) {  // marked for the prefixes q .. (next part) - 1
                        const int ex = s_np[q * E + e];
                        iv = ((1u << ex) - 1u) & ~((1u << q) - 1u);
                        iv >>= p0;
                    }
                }
            }
            unsigned mine = 0u;  // lane jj keeps prefix p0 + jj's word
#pragma unroll
            for (int jj = 0; jj < DS4_LOC_GP - 1; ++jj) {
                const unsigned bits = __ballot_sync(0xffffffffu, (iv >> jj) & 1u);
                mine = lane == jj ? bits : mine;
            }
            if (lane < np) s_bm[lane * nwb + w] = mine;
        }
        __syncthreads();
        for (int jj = warp; jj < np; jj += DS4_LOC_GP)  // s_sfx[w] = the bits set in the words after w
            ds4_suffix_counts(s_bm + jj * nwb, nw, s_sfx + jj * nwb, lane, false);
        __syncthreads();
        for (int f = tid; f < E; f += nt) {  // f's rank after the parts through p
            int key = -1;
            for (int p = 0; p < p0; ++p) key = max(key, s_last[p * E + f]);
            for (int jj = 0; jj < np; ++jj) {
                key = max(key, s_last[(p0 + jj) * E + f]);
                int n = -1;
                if (key >= 0) {
                    const int x = key - K0;
                    n = s_sfx[jj * nwb + (x >> 5)] + __popc((s_bm[jj * nwb + (x >> 5)] >> (x & 31)) >> 1);
                }
                pcum[(long long)(q0 + p0 + jj) * E + f] = n;
            }
        }
        __syncthreads();
    }
}

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

// Shared memory of one locality_accumulate block (ds4kern.recorder._accumulate_smem mirrors it):
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

// Adjacency of record r (lane's) with the previous record of its sequence, and the sequence's
// last record kept for the next call.  `cl` holds the layer's ids as the first kernel wrote them
// (int16, -1 invalid), `st` (if not null) a shared-memory copy of those of the records from r0
// on.  The previous record of a run's first record is the sequence's kept one: read here when the
// run is this one record (its thread alone reads and then writes it), else the snapshot prepare
// took.
__device__ __forceinline__ void ds4_adjacency(const short* cl, long long T, int k, int E, const void* pos, int pos64,
                                              long long pos_base, const void* seq, int seq64, long long num_seqs,
                                              const long long* snap_pos, const int* snap_ids, long long* prev_pos,
                                              int* prev_ids, unsigned* s_adj, long long r, const short* st,
                                              long long r0) {
    const long long sq = ds4_seq_of(seq, seq64, r);
    if (sq < 0 || sq >= num_seqs) return;
    const long long p = ds4_pos_of(pos, pos64, pos_base, r);
    const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
    const bool last_of_seq = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
    const bool direct = first && last_of_seq;
    const long long pp = direct ? prev_pos[sq] : first ? snap_pos[r] : ds4_pos_of(pos, pos64, pos_base, r - 1);
    auto id_of = [&](long long rr, int j) -> int {
        return st != nullptr && rr >= r0 ? (int)st[(rr - r0) * k + j] : (int)cl[rr * k + j];
    };
    auto B = [&](int j) -> int { return id_of(r, j); };
    if (pp == p - 1) {
        // A = the previous record's ids: kept, the snapshot, or the ids
        auto A = [&](int j) -> int {
            if (!first) return id_of(r - 1, j);
            const int a = direct ? prev_ids[sq * k + j] : snap_ids[r * k + j];
            return (a >= 0 && a < E) ? a : -1;
        };
        int inter = 0, na = 0, nb = 0, eq = 0;
        for (int j = 0; j < k; ++j) {
            const int a = A(j), b = B(j);
            if (a >= 0) {
                bool dup = false;
                for (int jj = 0; jj < j; ++jj) dup |= A(jj) == a;
                if (!dup) {
                    ++na;
                    bool in = false;
                    for (int jj = 0; jj < k; ++jj) in |= B(jj) == a;
                    inter += in;
                }
            }
            if (b >= 0) {
                bool dup = false;
                for (int jj = 0; jj < j; ++jj) dup |= B(jj) == b;
                nb += !dup;
            }
            eq += a >= 0 && a == b;
        }
        atomicAdd(&s_adj[0], 1u);
        atomicAdd(&s_adj[1], (unsigned)eq);
        atomicAdd(&s_adj[2 + inter * (2 * k + 1) + (na + nb - inter)], 1u);
    }
    if (last_of_seq) {
        prev_pos[sq] = p;
        for (int j = 0; j < k; ++j) prev_ids[sq * k + j] = B(j);
    }
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
