// locality.cu — online expert-locality recording (issue: locality profiler): two launches per
// call, no host synchronisation.  A call covers one layer or several layers of one step (grid y =
// the layer within the call: its ids / weights at i_ls / w_ls elements apart, its scratch rows;
// layer0 + y = the recorder's layer, whose state and counters it updates).
//
// Sets of experts are W-word bitsets (W = ceil(E / 32)).  An access is (record r, slot j); its
// key r * k + j orders the call's accesses.  The LRU stack distance of an access to e is the
// number of distinct experts accessed since the previous access to e (E if e was never accessed).
// The call's records are cut into parts of R records (one block each in both kernels), a part
// into sub-segments of RB records (RB <= 256, a power of two, R a multiple of RB).
//
// locality_prepare<W>: per part q, plast[q][f] = the key of f's last access in the part (-1 if
// none), por[q] = the part's experts and, for the experts it holds, pend[q][f] = the experts
// accessed in the part after f's last access there, i.e. those whose last access there is later
// (the held experts ranked by last key through a bitmap of the part's keys, then an OR scan).
// First records of a run of one sequence snapshot that sequence's previous record (position,
// ids) before the second kernel overwrites it.  One extra block per layer ranks the experts by
// their last access before this call (rank 0 = most recent), writes rb[i] = the set of experts
// of rank < i (the same OR scan, in rank order) and carries `last` into the next call's buffer.
//
// locality_accumulate<W>: per part, a table A[f] = the experts accessed since f's last access
// (before the current sub-segment), started from the earlier parts (walk back to the latest part
// holding f: its pend row | the ORs of the parts after it; none: all earlier parts | rb[rank[f]];
// never accessed: no row).  Per sub-segment, in shared memory: the ids, the chunk occupancy
// masks (bit b of occ[c][e]: record 32c + b holds e), a sparse table of the records' bitsets
// and each slot's prefix set within its record; one thread per access:
//   * e in an earlier slot of the record: the distinct experts in the slots between;
//   * else the latest earlier record p of the sub-segment holding e (chunk masks): its slots after
//     e's last slot there | records p+1 .. r-1 (two table rows) | the record's earlier slots;
//   * else A[e] | the sub-segment's records before r | the record's earlier slots, or E if e was
//     never accessed.
// Then one thread per record for the adjacency with the previous record of its sequence, and one
// per expert to move A past the sub-segment (held: its slots after the last access | the later
// records; not held: | the sub-segment's OR).  Counters gather in shared memory and go out with one
// global atomic per non-zero bin: integers (exact, order-free) and float64 weight sums (equal up
// to rounding order).
//
// Bytes per layer and step: the ids read twice, the weights once, per part E * (4 + 4W) bytes of
// pend / plast written and read back from L2, a few counters.
#include "common.cuh"

// acc |= row.  With rot (a multiple of 4 below W), acc[w] takes word w ^ rot: lanes that start
// their 16-byte loads at different quarters of 32- / 64-byte shared-memory rows spread over twice
// / four times the banks (only popcounts, unions and masks with the same rot may follow).
template <int W>
__device__ __forceinline__ void ds4_or_into(unsigned (&acc)[W], const unsigned* __restrict__ row, int rot = 0) {
    if constexpr (W % 4 == 0) {  // rows are 16-byte aligned where W is a multiple of 4
#pragma unroll
        for (int w = 0; w < W; w += 4) {
            const uint4 v = *reinterpret_cast<const uint4*>(row + (w ^ rot));
            acc[w] |= v.x;
            acc[w + 1] |= v.y;
            acc[w + 2] |= v.z;
            acc[w + 3] |= v.w;
        }
    } else {
#pragma unroll
        for (int w = 0; w < W; ++w) acc[w] |= row[w];
    }
}

template <int W>
__device__ __forceinline__ void ds4_store_row(unsigned* __restrict__ row, const unsigned (&v)[W]) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int w = 0; w < W; w += 4)
            *reinterpret_cast<uint4*>(row + w) = make_uint4(v[w], v[w + 1], v[w + 2], v[w + 3]);
    } else {
#pragma unroll
        for (int w = 0; w < W; ++w) row[w] = v[w];
    }
}

template <int W>
__device__ __forceinline__ void ds4_clear(unsigned (&acc)[W]) {
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = 0u;
}

// Branch-free on purpose: a compare-and-set per word lets the compiler turn the loop into one
// dynamically indexed store, which moves the whole array to local memory.
template <int W>
__device__ __forceinline__ void ds4_add_expert(unsigned (&acc)[W], int e, int rot = 0) {
    const unsigned bit = 1u << (e & 31);
    const int word = (e >> 5) ^ rot;
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] |= bit & (0u - (unsigned)(word == w));
}

// t / k for 0 <= t < 2^16, k <= 32, rk = 1/k: (t + 1/2) / k lies at least 1/(2k) from an
// integer, far beyond the float rounding there (an integer division is ~20 instructions)
__device__ __forceinline__ int ds4_div(int t, int k, float rk) {
    return (int)(((float)t + 0.5f) * rk);
}

// Whether e is in the set (a select per word, as ds4_add_expert, keeps the array in registers).
template <int W>
__device__ __forceinline__ bool ds4_has_expert(const unsigned (&acc)[W], int e, int rot = 0) {
    const int word = (e >> 5) ^ rot;
    unsigned v = 0u;
#pragma unroll
    for (int w = 0; w < W; ++w) v |= acc[w] & (0u - (unsigned)(word == w));
    return (v >> (e & 31)) & 1u;
}

template <int W>
__device__ __forceinline__ int ds4_popc(const unsigned (&acc)[W]) {
    int n = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) n += __popc(acc[w]);
    return n;
}

__device__ __forceinline__ long long ds4_seq_of(const void* seq, int seq64, long long r) {
    if (seq == nullptr) return 0;
    return seq64 ? static_cast<const long long*>(seq)[r] : (long long)static_cast<const int*>(seq)[r];
}

__device__ __forceinline__ long long ds4_pos_of(const void* pos, int pos64, long long base, long long r) {
    if (pos == nullptr) return base + r;
    return pos64 ? static_cast<const long long*>(pos)[r] : (long long)static_cast<const int*>(pos)[r];
}

// The lanes of this warp whose expert f (= a multiple of 32 + lane, in a loop of whole warps
// over the experts) is below E.
__device__ __forceinline__ unsigned ds4_expert_lanes(int f, int E) {
    const int f0 = f & ~31;
    return E - f0 >= 32 ? 0xffffffffu : (1u << (E - f0)) - 1u;
}

__host__ __device__ __forceinline__ long long ds4_align16(long long bytes) { return (bytes + 15) & ~15LL; }

// Moves the per-layer pointers to this block's layer: li = the layer within the call (scratch),
// layer = the recorder's layer (its state).  Both kernels, one layout.
template <int W, typename PL, typename PE, typename PO, typename RBP, typename RK, typename SP, typename SI,
          typename PP, typename PI>
__device__ __forceinline__ void ds4_to_layer(long long li, long long layer, int E, int k, int NP, long long T,
                                             long long num_seqs, long long* last, int parity,
                                             const long long*& last_cur, long long*& last_next, PL& plast, PE& pend,
                                             PO& por, RBP& rb, RK& rank, SP& snap_pos, SI& snap_ids, PP& prev_pos,
                                             PI& prev_ids) {
    last_cur = last + layer * 2 * E + parity * E;  // `last` double-buffered: read one, write the other
    last_next = last + layer * 2 * E + (1 - parity) * E;
    plast += li * NP * E;
    pend += li * NP * E * W;
    por += li * NP * W;
    rb += layer * (E + 1) * W;
    rank += layer * E;
    snap_pos += li * T;
    snap_ids += li * T * k;
    prev_pos += layer * num_seqs;
    prev_ids += layer * num_seqs * k;
}

// rows[n] for n = 0..E: the set of experts order[0 .. n-1] (only the first A entries of order
// are experts; rows beyond A repeat row A): an OR scan over the experts in that order, warp scans
// then the warps' totals.  Every thread of the block (256, as both kernels launch) calls it.
template <int W>
__device__ __forceinline__ void ds4_or_scan(const int* order, int A, int E, unsigned* rows) {
    __shared__ unsigned wtot[8][W];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned carry[W];
    ds4_clear<W>(carry);
    if (threadIdx.x < W) rows[threadIdx.x] = 0u;
    for (int base = 0; base < E; base += blockDim.x) {  // block-uniform
        const int n = base + threadIdx.x;
        unsigned v[W];
        ds4_clear<W>(v);
        if (n < A) ds4_add_expert<W>(v, order[n]);
#pragma unroll
        for (int w = 0; w < W; ++w) {
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned u = __shfl_up_sync(0xffffffffu, v[w], off);
                if (lane >= off) v[w] |= u;
            }
            if (lane == 31) wtot[warp][w] = v[w];
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < W; ++w) {
            unsigned all = carry[w];
#pragma unroll
            for (int j = 0; j < 8; ++j) {  // blockDim.x == 256
                if (j < warp) v[w] |= wtot[j][w];
                all |= wtot[j][w];
            }
            v[w] |= carry[w];
            carry[w] = all;
            if (n < E) rows[(long long)(n + 1) * W + w] = v[w];
        }
        __syncthreads();
    }
}

// The ranks of the experts by last access before this call (0 = most recent; accessed experts
// have distinct times, so their ranks are 0..A-1), the prefix sets rb[i] = {experts of rank < i},
// and `last` carried into the next buffer.
template <int W>
__device__ __forceinline__ void ds4_rank_block(const long long* __restrict__ last_cur,
                                               long long* __restrict__ last_next, int E, unsigned* __restrict__ rb,
                                               int* __restrict__ rank) {
    __shared__ long long sl[512];
    __shared__ int order[512];
    __shared__ int accessed;
    if (threadIdx.x == 0) accessed = 0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        sl[e] = last_cur[e];
        last_next[e] = sl[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const long long le = sl[e];
        int n = 0;
#pragma unroll 4
        for (int f = 0; f < E; ++f) n += sl[f] > le;
        rank[e] = n;
        if (le >= 0) {
            order[n] = e;
            atomicAdd(&accessed, 1);
        }
    }
    __syncthreads();
    ds4_or_scan<W>(order, accessed, E, rb);
}

// Shared memory of one locality_prepare part block (ds4kern.recorder._prepare_smem mirrors it):
// prefix sets [E + 1][W], last keys [E], experts in recency order [E], the bitmap of the part's
// last keys [ceil(R k / 32)] and its suffix popcounts [same].
__host__ __device__ __forceinline__ long long ds4_prepare_smem(int E, int W, int k, int R) {
    const long long nw = ((long long)R * k + 31) / 32;
    return ds4_align16(4LL * (E + 1) * W) + ds4_align16(4LL * E) + ds4_align16(4LL * E) + ds4_align16(4 * nw) +
           ds4_align16(4 * nw);
}

template <int W>
__global__ void __launch_bounds__(256)
locality_prepare(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls, long long T,
                 int k, int E, const void* __restrict__ seq, int seq64, long long num_seqs,
                 const long long* __restrict__ prev_pos, const int* __restrict__ prev_ids, long long* __restrict__ last,
                 int parity, int R, int NP, int* __restrict__ plast, unsigned* __restrict__ pend,
                 unsigned* __restrict__ por, unsigned* __restrict__ rb, int* __restrict__ rank,
                 long long* __restrict__ snap_pos, int* __restrict__ snap_ids, int layer0) {
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long ioff = li * i_ls;  // ids of this layer
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer<W>(li, layer, E, k, NP, T, num_seqs, last, parity, last_cur, last_next, plast, pend, por, rb, rank,
                    snap_pos, snap_ids, prev_pos, prev_ids);
    if ((int)blockIdx.x == NP) {
        ds4_rank_block<W>(last_cur, last_next, E, rb, rank);
        return;
    }
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    const int q = blockIdx.x;
    const long long r0 = (long long)q * R;
    const int nrec = (int)min((long long)R, T - r0), nch = (nrec + 31) / 32;
    const long long K0 = r0 * k;  // the part's first key
    const int nw = (nrec * k + 31) / 32;
    const long long nwa = ((long long)R * k + 31) / 32;
    unsigned* s_rows = reinterpret_cast<unsigned*>(smem);  // row n: the n most recent experts
    int* s_last = reinterpret_cast<int*>(smem + ds4_align16(4LL * (E + 1) * W));  // last key, then rank
    int* s_order = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_last) + ds4_align16(4LL * E));
    unsigned* s_bm = reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(s_order) + ds4_align16(4LL * E));
    int* s_sfx = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_bm) + ds4_align16(4 * nwa));
    __shared__ int s_held;
    for (int e = tid; e < E; e += nt) s_last[e] = -1;
    for (int w = tid; w < nw; w += nt) s_bm[w] = 0u;
    __syncthreads();
    // warps own chunks of 32 records (lane = record): last keys, adjacency snapshots
    for (int c = warp; c < nch; c += nt >> 5) {
        const int i = c * 32 + lane;
        const long long r = r0 + i;
        if (i < nrec) {
            for (int s = 0; s < k; ++s) {
                const int e = ds4_load_index(ids, idx_kind, ioff + r * i_rs + s * i_cs);
                if (e >= 0 && e < E) atomicMax(&s_last[e], (int)(r * k + s));
            }
            // adjacency snapshot for the first record of a run of one sequence
            const long long sq = ds4_seq_of(seq, seq64, r);
            const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
            if (first && sq >= 0 && sq < num_seqs) {
                snap_pos[r] = prev_pos[sq];
                for (int s = 0; s < k; ++s) snap_ids[r * k + s] = prev_ids[sq * k + s];
            }
        }
    }
    __syncthreads();
    // The experts accessed in the part after f's last access there are those whose last access
    // there is later: rank the last keys (a bitmap over the part's keys, suffix popcounts), then an
    // OR scan in that order.
    for (int f = tid; f < E; f += nt) {
        const int key = s_last[f];
        plast[(long long)q * E + f] = key;
        if (key >= 0) atomicOr(&s_bm[(key - K0) >> 5], 1u << ((key - K0) & 31));
    }
    __syncthreads();
    if (warp == 0) {  // s_sfx[w] = the bits set in the words after w
        int carry = 0;
        for (int base = (nw - 1) & ~31; base >= 0; base -= 32) {
            const int w = base + lane;
            const int v = w < nw ? __popc(s_bm[w]) : 0;
            int incl = v;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int u = __shfl_down_sync(0xffffffffu, incl, off);
                if (lane + off < 32) incl += u;
            }
            if (w < nw) s_sfx[w] = incl - v + carry;
            carry += __shfl_sync(0xffffffffu, incl, 0);
        }
        if (lane == 0) s_held = carry;
    }
    __syncthreads();
    for (int f = tid; f < E; f += nt) {  // the rank of f's last key (keys after it), kept in s_last
        const int key = s_last[f];
        if (key < 0) continue;
        const int x = (int)(key - K0);
        const int n = s_sfx[x >> 5] + __popc((s_bm[x >> 5] >> (x & 31)) >> 1);
        s_order[n] = f;
        s_last[f] = n;
    }
    __syncthreads();
    const int held = s_held;
    ds4_or_scan<W>(s_order, held, E, s_rows);
    if (tid < W) por[q * W + tid] = s_rows[held * W + tid];
    for (int f = tid; f < E; f += nt) {
        const int n = s_last[f];  // rank, or -1: not in the part
        if (n < 0) continue;
        unsigned acc[W];
        ds4_clear<W>(acc);
        ds4_or_into<W>(acc, s_rows + n * W);
        ds4_store_row<W>(pend + ((long long)q * E + f) * W, acc);
    }
}

// The two sparse-table rows whose OR is the sub-segment's records [a, b] (a <= b).
template <int W>
__device__ __forceinline__ void ds4_range_rows(const unsigned* tab, int RB, int a, int b, const unsigned*& x,
                                               const unsigned*& y) {
    const int l = 31 - __clz(b - a + 1);
    x = tab + ((long long)l * RB + a) * W;
    y = tab + ((long long)l * RB + b - (1 << l) + 1) * W;
}

// The two rows whose OR is all the sub-segment's nrec records (levels stop below nrec: two rows
// of the highest cover it).
template <int W>
__device__ __forceinline__ void ds4_all_rows(const unsigned* tab, int RB, int nrec, const unsigned*& x,
                                             const unsigned*& y) {
    if (nrec == 1) {
        x = y = tab;
        return;
    }
    const int l = 31 - __clz(nrec - 1);
    x = tab + (long long)l * RB * W;
    y = tab + ((long long)l * RB + nrec - (1 << l)) * W;
}

// The experts of record p's slots after ls: its set less the prefix through ls (rows x & ~y)
// when it repeats no id, else added slot by slot into acc (x, y stay as they are).
template <int W>
__device__ __forceinline__ void ds4_after_rows(unsigned (&acc)[W], const unsigned* s_tab, const unsigned* s_ps,
                                               const int* s_free, const int* s_ids, int k, int p, int ls,
                                               const unsigned*& x, const unsigned*& y, int rot) {
    if (ls + 1 >= k) return;
    if (s_free[p]) {
        x = s_tab + p * W;
        y = s_ps + (p * (k - 1) + ls) * W;  // slots 0 .. ls
    } else {
        for (int jj = ls + 1; jj < k; ++jj)
            if (s_ids[p * k + jj] >= 0) ds4_add_expert<W>(acc, s_ids[p * k + jj], rot);
    }
}

// acc |= a | b | (c & ~d), four rows of shared memory
template <int W>
__device__ __forceinline__ void ds4_or_rows(unsigned (&acc)[W], const unsigned* a, const unsigned* b,
                                            const unsigned* c, const unsigned* d, int rot) {
    unsigned va[W], vb[W], vc[W], vd[W];
    ds4_clear<W>(va);
    ds4_clear<W>(vb);
    ds4_clear<W>(vc);
    ds4_clear<W>(vd);
    ds4_or_into<W>(va, a, rot);
    ds4_or_into<W>(vb, b, rot);
    ds4_or_into<W>(vc, c, rot);
    ds4_or_into<W>(vd, d, rot);
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] |= va[w] | vb[w] | (vc[w] & ~vd[w]);
}

// The last slot of e in a record of <= 8 slots stored as bytes (invalid slots masked off).
__device__ __forceinline__ int ds4_last_slot8(const uint2* idb, const uint2* vm, int p, int e) {
    const unsigned e4 = 0x01010101u * (unsigned)e;
    const uint2 x = idb[p], v = vm[p];
    const unsigned m1 = __vcmpeq4(x.y, e4) & v.y, m0 = __vcmpeq4(x.x, e4) & v.x;
    return m1 ? 4 + ((31 - __clz(m1)) >> 3) : ((31 - __clz(m0)) >> 3);
}

// The last slot of e in record p: byte compares where the ids are kept as bytes, else a loop.
__device__ __forceinline__ int ds4_last_slot(bool bytes, const uint2* idb, const uint2* vm, const int* s_ids, int k,
                                             int p, int e) {
    if (bytes) return ds4_last_slot8(idb, vm, p, e);
    int ls = -1;
    for (int jj = 0; jj < k; ++jj)
        if (s_ids[p * k + jj] == e) ls = jj;
    return ls;
}

// Shared memory of one locality_accumulate block (ds4kern.recorder._accumulate_smem mirrors it):
// counters (float64 weight sums, integer bins, adjacency), the table A [E][W] and its "seen" set,
// a zero row, then the sub-segment's ids [RB][k] (and, where k <= 8 and E <= 256, as bytes [RB][8]
// with a byte mask of the valid slots [RB][8]), chunk masks [RB/32][E], sparse table [log2 RB][RB][W], slot
// prefixes [RB][k - 1][W] (slots 0 .. j - 1 for j >= 1) and which records repeat no id [RB].
struct Ds4AccLayout {
    long long wsum, wdist, hist, dist, adj, A, seen, zero, ids, idb, vm, occ, tab, ps, free_, total;
};

__host__ __device__ __forceinline__ Ds4AccLayout ds4_acc_layout(int E, int W, int k, int adj_len, int RB) {
    Ds4AccLayout o;
    int levels = 0;
    while ((2 << levels) <= RB) ++levels;  // log2(RB)
    o.wsum = 0;
    o.wdist = o.wsum + ds4_align16(8LL * E);
    o.hist = o.wdist + ds4_align16(8LL * (E + 1));
    o.dist = o.hist + ds4_align16(4LL * E);
    o.adj = o.dist + ds4_align16(4LL * (E + 1));
    o.A = o.adj + ds4_align16(4LL * adj_len);
    o.seen = o.A + ds4_align16(4LL * E * W);
    o.zero = o.seen + ds4_align16(4LL * W);
    o.ids = o.zero + ds4_align16(4LL * W);
    o.idb = o.ids + ds4_align16(4LL * RB * k);
    o.vm = o.idb + 8LL * RB;
    o.occ = o.vm + 8LL * RB;
    o.tab = o.occ + ds4_align16(4LL * (RB / 32) * E);
    o.ps = o.tab + ds4_align16(4LL * levels * RB * W);
    o.free_ = o.ps + ds4_align16(4LL * RB * (k - 1) * W);
    o.total = o.free_ + ds4_align16(4LL * RB);
    return o;
}

template <int W>
__global__ void __launch_bounds__(256, W >= 16 ? 2 : 3)  // three blocks per SM (<= ~74 kB each); E > 256: two
locality_accumulate(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls,
                    const float* __restrict__ weights, long long w_rs, long long w_cs, long long w_ls, long long T,
                    int k, int E, const void* __restrict__ pos, int pos64, long long pos_base,
                    const void* __restrict__ seq, int seq64, long long num_seqs, long long clock,
                    long long* __restrict__ last, int parity, int* __restrict__ plast, unsigned* __restrict__ pend,
                    unsigned* __restrict__ por, unsigned* __restrict__ rb, int* __restrict__ rank,
                    long long* __restrict__ snap_pos, int* __restrict__ snap_ids,
                    long long* __restrict__ prev_pos, int* __restrict__ prev_ids,
                    unsigned long long* __restrict__ hist, double* __restrict__ wsum,
                    unsigned long long* __restrict__ dist, double* __restrict__ wdist,
                    unsigned long long* __restrict__ adj, int adj_len, int layer0, int R, int RB, int NP) {
    extern __shared__ __align__(16) unsigned char smem[];
    const Ds4AccLayout o = ds4_acc_layout(E, W, k, adj_len, RB);
    double* s_wsum = reinterpret_cast<double*>(smem + o.wsum);
    double* s_wdist = reinterpret_cast<double*>(smem + o.wdist);
    unsigned* s_hist = reinterpret_cast<unsigned*>(smem + o.hist);
    unsigned* s_dist = reinterpret_cast<unsigned*>(smem + o.dist);
    unsigned* s_adj = reinterpret_cast<unsigned*>(smem + o.adj);
    unsigned* s_A = reinterpret_cast<unsigned*>(smem + o.A);
    unsigned* s_seen = reinterpret_cast<unsigned*>(smem + o.seen);
    unsigned* s_zero = reinterpret_cast<unsigned*>(smem + o.zero);
    int* s_ids = reinterpret_cast<int*>(smem + o.ids);
    uint2* s_idb = reinterpret_cast<uint2*>(smem + o.idb);
    uint2* s_vm = reinterpret_cast<uint2*>(smem + o.vm);
    const bool bytes = k <= 8 && E <= 256;  // the last slot of an expert in a record by byte compares
    const int rot = W >= 8 ? (threadIdx.x & (W / 4 - 1)) * 4 : 0;  // see ds4_or_into
    unsigned* s_occ = reinterpret_cast<unsigned*>(smem + o.occ);
    unsigned* s_tab = reinterpret_cast<unsigned*>(smem + o.tab);
    unsigned* s_ps = reinterpret_cast<unsigned*>(smem + o.ps);
    int* s_free = reinterpret_cast<int*>(smem + o.free_);

    const int tid = threadIdx.x, nt = blockDim.x;
    const float rk = 1.0f / (float)k;
    const long long li = blockIdx.y, layer = layer0 + li;
    const int q = blockIdx.x;
    const long long r0 = (long long)q * R;
    const int nrec_part = (int)min((long long)R, T - r0);
    const long long ioff = li * i_ls;
    if (weights != nullptr) weights += li * w_ls;
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer<W>(li, layer, E, k, NP, T, num_seqs, last, parity, last_cur, last_next, plast, pend, por, rb, rank,
                    snap_pos, snap_ids, prev_pos, prev_ids);
    hist += layer * E;
    wsum += layer * E;
    dist += layer * (E + 1);
    wdist += layer * (E + 1);
    adj += layer * adj_len;

    for (int e = tid; e < E; e += nt) {
        s_wsum[e] = 0.0;
        s_hist[e] = 0u;
    }
    for (int d = tid; d <= E; d += nt) {
        s_wdist[d] = 0.0;
        s_dist[d] = 0u;
    }
    for (int t = tid; t < adj_len; t += nt) s_adj[t] = 0u;
    if (tid < W) {
        s_seen[tid] = 0u;
        s_zero[tid] = 0u;
    }
    __syncthreads();
    // A at the part's start: walk back to the latest earlier part holding f (4 parts a round)
    for (int f = tid; f < E; f += nt) {
        unsigned a[W];
        ds4_clear<W>(a);
        int found = -1;
        for (int qq = q - 1; qq >= 0 && found < 0; qq -= 4) {
            int key[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) key[u] = qq - u >= 0 ? plast[(long long)(qq - u) * E + f] : -2;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (found >= 0 || key[u] == -2) continue;
                if (key[u] >= 0) found = qq - u;
                else ds4_or_into<W>(a, por + (long long)(qq - u) * W);
            }
        }
        bool seen = true;
        if (found >= 0) ds4_or_into<W>(a, pend + ((long long)found * E + f) * W);
        else if (last_cur[f] >= 0) ds4_or_into<W>(a, rb + (long long)rank[f] * W);
        else seen = false;
        ds4_store_row<W>(s_A + f * W, a);
        const unsigned bits = __ballot_sync(ds4_expert_lanes(f, E), seen);  // lane = f & 31
        if ((f & 31) == 0) s_seen[f >> 5] = bits;
    }

    for (int s0 = 0; s0 < nrec_part; s0 += RB) {
        const long long R0 = r0 + s0;
        const int nrec = min(RB, nrec_part - s0), nch = (nrec + 31) / 32;
        for (int t = tid; t < nch * E; t += nt) s_occ[t] = 0u;
        if (bytes)
            for (int i = tid; i < nrec; i += nt) {
                s_idb[i] = make_uint2(~0u, ~0u);
                s_vm[i] = make_uint2(0u, 0u);
            }
        __syncthreads();
        for (int t = tid; t < nrec * k; t += nt) {
            const int i = ds4_div(t, k, rk), j = t - i * k;
            const int e = ds4_load_index(ids, idx_kind, ioff + (R0 + i) * i_rs + j * i_cs);
            const bool ok = e >= 0 && e < E;
            s_ids[t] = ok ? e : -1;
            if (ok) {
                atomicOr(&s_occ[(i >> 5) * E + e], 1u << (i & 31));
                if (bytes) {
                    reinterpret_cast<unsigned char*>(s_idb)[i * 8 + j] = (unsigned char)e;
                    reinterpret_cast<unsigned char*>(s_vm)[i * 8 + j] = 0xffu;
                }
            }
        }
        __syncthreads();
        for (int i = tid; i < nrec; i += nt) {  // level 0: the records' bitsets, and their slot prefixes
            unsigned bits[W];
            ds4_clear<W>(bits);
            int nvalid = 0;
            for (int j = 0; j < k; ++j) {
                if (j > 0) ds4_store_row<W>(s_ps + (i * (k - 1) + j - 1) * W, bits);
                const int e = s_ids[i * k + j];
                if (e >= 0) {
                    ds4_add_expert<W>(bits, e);
                    ++nvalid;
                }
            }
            ds4_store_row<W>(s_tab + i * W, bits);
            s_free[i] = ds4_popc<W>(bits) == nvalid;
        }
        __syncthreads();
        for (int l = 1; (1 << l) < nrec; ++l) {  // level l: OR of records i .. i + 2^l - 1
            const int h = 1 << (l - 1);
            const unsigned* src = s_tab + (l - 1) * RB * W;
            unsigned* dst = s_tab + l * RB * W;
            if constexpr (W % 4 == 0) {  // 16-byte rows quarters
                const uint4* s4 = reinterpret_cast<const uint4*>(src);
                uint4* d4 = reinterpret_cast<uint4*>(dst);
                for (int t = tid; t < nrec * (W / 4); t += nt) {
                    uint4 a = s4[t];
                    if (t / (W / 4) + h < nrec) {
                        const uint4 b = s4[t + h * (W / 4)];
                        a = make_uint4(a.x | b.x, a.y | b.y, a.z | b.z, a.w | b.w);
                    }
                    d4[t] = a;
                }
            } else {
                for (int t = tid; t < nrec * W; t += nt) {
                    const int i = t / W;
                    dst[t] = src[t] | (i + h < nrec ? src[t + h * W] : 0u);
                }
            }
            __syncthreads();
        }

        // one thread per access: U = the record's earlier slots | ra | rb | (rc & ~rd), rows picked
        // per path (unused ones the zero row) and then loaded by every lane alike
        for (int t = tid; t < nrec * k; t += nt) {
            const int e = s_ids[t];
            if (e < 0) continue;
            const int i = ds4_div(t, k, rk), j = t - i * k;
            const long long r = R0 + i;
            unsigned acc[W];  // the experts of the earlier slots (words rotated by rot)
            ds4_clear<W>(acc);
            if (j > 0) ds4_or_into<W>(acc, s_ps + (i * (k - 1) + j - 1) * W, rot);
            const unsigned *ra = s_zero, *rb_ = s_zero, *rc = s_zero, *rd = s_zero;
            int d = -1;
            if (!s_free[i] && ds4_has_expert<W>(acc, e, rot)) {
                // e is in an earlier slot too: the distinct experts in the slots since its latest one
                const int* rec = s_ids + i * k;
                int same = -1;
                for (int jj = 0; jj < j; ++jj)
                    if (rec[jj] == e) same = jj;
                ds4_clear<W>(acc);
                for (int jj = same + 1; jj < j; ++jj)
                    if (rec[jj] >= 0) ds4_add_expert<W>(acc, rec[jj], rot);
            } else {
                // the latest earlier record of the sub-segment holding e (chunk masks)
                int pl = -1;
                for (int c = i >> 5; c >= 0; --c) {
                    unsigned m = s_occ[c * E + e];
                    if (c == (i >> 5)) m &= (1u << (i & 31)) - 1u;
                    if (m) {
                        pl = c * 32 + 31 - __clz(m);
                        break;
                    }
                }
                if (pl >= 0) {
                    if (pl + 1 <= i - 1) ds4_range_rows<W>(s_tab, RB, pl + 1, i - 1, ra, rb_);
                    const int ls = ds4_last_slot(bytes, s_idb, s_vm, s_ids, k, pl, e);
                    ds4_after_rows<W>(acc, s_tab, s_ps, s_free, s_ids, k, pl, ls, rc, rd, rot);
                } else if ((s_seen[e >> 5] >> (e & 31)) & 1u) {
                    if (i > 0) ds4_range_rows<W>(s_tab, RB, 0, i - 1, ra, rb_);
                    rc = s_A + e * W;
                } else {
                    d = E;  // never accessed before: a miss at every cache size
                }
            }
            if (d < 0) {
                ds4_or_rows<W>(acc, ra, rb_, rc, rd, rot);
                d = ds4_popc<W>(acc);
            }
            atomicAdd(&s_hist[e], 1u);
            atomicAdd(&s_dist[d], 1u);
            if (weights != nullptr) {
                const double wt = (double)weights[r * w_rs + j * w_cs];
                atomicAdd(&s_wsum[e], wt);
                atomicAdd(&s_wdist[d], wt);
            }
        }

        // one thread per record: adjacency with the previous record of its sequence
        for (int i = tid; i < nrec; i += nt) {
            const long long r = R0 + i;
            const long long sq = ds4_seq_of(seq, seq64, r);
            if (sq < 0 || sq >= num_seqs) continue;
            const long long p = ds4_pos_of(pos, pos64, pos_base, r);
            const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
            const long long pp = first ? snap_pos[r] : ds4_pos_of(pos, pos64, pos_base, r - 1);
            const bool last_of_seq = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
            const int* B = s_ids + i * k;
            if (pp == p - 1) {
                // A = the previous record's ids: snapshot, this sub-segment, or the ids array
                auto A = [&](int j) -> int {
                    const int a = first ? snap_ids[r * k + j]
                                        : (i > 0 ? s_ids[(i - 1) * k + j]
                                                 : ds4_load_index(ids, idx_kind, ioff + (r - 1) * i_rs + j * i_cs));
                    return (a >= 0 && a < E) ? a : -1;
                };
                int inter = 0, na = 0, nb = 0, eq = 0;
                for (int j = 0; j < k; ++j) {
                    const int a = A(j), b = B[j];
                    if (a >= 0) {
                        bool dup = false;
                        for (int jj = 0; jj < j; ++jj) dup |= A(jj) == a;
                        if (!dup) {
                            ++na;
                            bool in = false;
                            for (int jj = 0; jj < k; ++jj) in |= B[jj] == a;
                            inter += in;
                        }
                    }
                    if (b >= 0) {
                        bool dup = false;
                        for (int jj = 0; jj < j; ++jj) dup |= B[jj] == b;
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
                for (int j = 0; j < k; ++j) prev_ids[sq * k + j] = B[j];
            }
        }
        __syncthreads();
        if (s0 + RB >= nrec_part) break;  // block-uniform: the part's last sub-segment
        // A past the sub-segment: held experts from their last access, the others gain its OR
        for (int f = tid; f < E; f += nt) {
            int pl = -1;
            for (int c = nch - 1; c >= 0; --c) {
                const unsigned m = s_occ[c * E + f];
                if (m) {
                    pl = c * 32 + 31 - __clz(m);
                    break;
                }
            }
            unsigned a[W];
            ds4_clear<W>(a);
            const unsigned *ra = s_zero, *rb_ = s_zero, *rc = s_zero, *rd = s_zero;
            if (pl >= 0) {
                if (pl + 1 <= nrec - 1) ds4_range_rows<W>(s_tab, RB, pl + 1, nrec - 1, ra, rb_);
                const int ls = ds4_last_slot(bytes, s_idb, s_vm, s_ids, k, pl, f);
                ds4_after_rows<W>(a, s_tab, s_ps, s_free, s_ids, k, pl, ls, rc, rd, 0);
            } else {
                ds4_all_rows<W>(s_tab, RB, nrec, ra, rb_);
                rc = s_A + f * W;
            }
            ds4_or_rows<W>(a, ra, rb_, rc, rd, 0);  // stored: no rotation
            ds4_store_row<W>(s_A + f * W, a);
            const unsigned held = __ballot_sync(ds4_expert_lanes(f, E), pl >= 0);
            if ((f & 31) == 0) s_seen[f >> 5] |= held;
        }
        __syncthreads();
    }

    // the block's counters into the layer's
    for (int e = tid; e < E; e += nt) {
        if (s_hist[e]) {
            atomicAdd(&hist[e], (unsigned long long)s_hist[e]);
            if (weights != nullptr) atomicAdd(&wsum[e], s_wsum[e]);
        }
        const int key = plast[(long long)q * E + e];
        if (key >= 0) atomicMax(&last_next[e], clock + key);
    }
    for (int d = tid; d <= E; d += nt)
        if (s_dist[d]) {
            atomicAdd(&dist[d], (unsigned long long)s_dist[d]);
            if (weights != nullptr) atomicAdd(&wdist[d], s_wdist[d]);
        }
    for (int t = tid; t < adj_len; t += nt)
        if (s_adj[t]) atomicAdd(&adj[t], (unsigned long long)s_adj[t]);
}
