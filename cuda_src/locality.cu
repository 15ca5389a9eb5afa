// locality.cu — online expert-locality recording (issue: locality profiler): two launches per
// call, no host synchronisation.  A call covers one layer or several layers of one step (grid y =
// the layer within the call: its ids / weights at i_ls / w_ls elements apart, its scratch rows;
// layer0 + y = the recorder's layer, whose state and counters it updates).
//
// locality_prepare<W>: W = ceil(E / 32) words per expert bitset.  Warps own chunks of 32 records
// (lane = record): each writes its record's suffix OR within the chunk (srow [T, W]: the experts
// of records r .. chunk end), the chunk's OR (chunkbits [ceil(T/32), W]) and the chunk's
// occupancy masks (occ [ceil(T/32), E]: bit b of occ[c][e] = record 32c + b holds e).  First
// records of a run of one sequence snapshot that sequence's previous record (its position and
// ids) before the second kernel overwrites it.  The last block of each layer ranks the experts by
// their last access before this step (rank 0 = most recent) and writes rb[i] = the set of experts
// of rank < i (an OR scan over the experts in rank order), so "experts used since e's last
// access" is one row; it also carries `last` into the next step's buffer.
//
// locality_accumulate<W>: blocks of RB records (a multiple of 32) with the block's ids, chunk
// masks, a sparse table of its records' bitsets, each slot's prefix set within its record and the
// suffix ORs of the DS4_LOC_WIN chunks before the block in shared memory; one thread per access,
// then one per record.  Per access: histogram and weight sum; the LRU stack distance (distinct
// experts since the previous access of the same expert, in record order then slot order) =
// popcount of the OR of the earlier slots of the record (its prefix set) and: the slots between
// an earlier slot holding e, or the records since the previous one holding e (found by the chunk
// masks: the block's in shared memory, earlier chunks 8 loads a round) as two sparse-table rows
// inside the block, or the block's prefix + the suffix row of that record's chunk + the whole
// chunks between (one window row, a loop beyond it), or, when e is not in this step, the block's
// prefix + the earlier chunks + rb[rank[e]].  Per record: the adjacency with the previous record of its
// sequence (intersection / union histogram, same-slot matches).  Counters gather in shared memory
// and go out with one global atomic per non-zero bin; integers (exact, order-free) and float64
// weight sums (equal up to rounding order).
//
// Bytes per layer and step: the ids (T*k*sizeof(index)) read twice, the weights once, T*W*4
// suffix rows + T*E/8 chunk masks written and read back from L2, a few counters.
#include "common.cuh"

template <int W>
__device__ __forceinline__ void ds4_or_into(unsigned (&acc)[W], const unsigned* __restrict__ row) {
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] |= row[w];
}

// Branch-free on purpose: a compare-and-set per word lets the compiler turn the loop into one
// dynamically indexed store, which moves the whole array to local memory.
template <int W>
__device__ __forceinline__ void ds4_add_expert(unsigned (&acc)[W], int e) {
    const unsigned bit = 1u << (e & 31);
    const int word = e >> 5;
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] |= bit & (0u - (unsigned)(word == w));
}

#define DS4_LOC_WIN 32  // chunks before an accumulate block whose suffix ORs it keeps

// t / k for 0 <= t < 2^16, k <= 32, rk = 1/k: (t + 1/2) / k lies at least 1/(2k) from an
// integer, far beyond the float rounding there (an integer division is ~20 instructions)
__device__ __forceinline__ int ds4_div(int t, int k, float rk) {
    return (int)(((float)t + 0.5f) * rk);
}

// Whether e is in the set (a select per word, as ds4_add_expert, keeps the array in registers).
template <int W>
__device__ __forceinline__ bool ds4_has_expert(const unsigned (&acc)[W], int e) {
    const int word = e >> 5;
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

// Moves the per-layer pointers to this block's layer: li = the layer within the call (the ids'
// scratch rows), layer = the recorder's layer (its state).  Both kernels, one layout.
template <int W, typename A, typename B, typename C, typename D, typename F, typename G, typename H, typename J,
          typename K>
__device__ __forceinline__ void ds4_to_layer(long long li, long long layer, long long T, int E, int k,
                                             long long num_seqs, long long* last, int parity,
                                             const long long*& last_cur, long long*& last_next, A& srow,
                                             B& chunkbits, C& occ, D& rb, F& rank, G& snap_pos, H& snap_ids,
                                             J& prev_pos, K& prev_ids) {
    const long long chunks = (T + 31) / 32;
    last_cur = last + layer * 2 * E + parity * E;  // `last` double-buffered: read one, write the other
    last_next = last + layer * 2 * E + (1 - parity) * E;
    srow += li * T * W;
    chunkbits += li * chunks * W;
    occ += li * chunks * E;
    rb += layer * (E + 1) * W;
    rank += layer * E;
    snap_pos += li * T;
    snap_ids += li * T * k;
    prev_pos += layer * num_seqs;
    prev_ids += layer * num_seqs * k;
}

template <int W>
__global__ void __launch_bounds__(256)
locality_prepare(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls, long long T,
                 int k, int E, const void* __restrict__ seq, int seq64, long long num_seqs,
                 const long long* __restrict__ prev_pos, const int* __restrict__ prev_ids, long long* __restrict__ last,
                 int parity, unsigned* __restrict__ srow, unsigned* __restrict__ chunkbits, unsigned* __restrict__ occ,
                 unsigned* __restrict__ rb, int* __restrict__ rank, long long* __restrict__ snap_pos, int* __restrict__ snap_ids, int chunk_blocks,
                 int layer0) {
    const int lane = threadIdx.x & 31;
    // blockIdx.y: the layer within this call (scratch, ids); layer0 + blockIdx.y: the recorder's layer (state)
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long ioff = li * i_ls;  // ids of this layer
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer<W>(li, layer, T, E, k, num_seqs, last, parity, last_cur, last_next, srow, chunkbits, occ, rb, rank,
                    snap_pos, snap_ids, prev_pos, prev_ids);
    if ((int)blockIdx.x == chunk_blocks) {
        // ranks of the experts by last access before this step (0 = most recent; accessed experts
        // have distinct times, so their ranks are 0..A-1) and the prefix sets rb[i] = {experts of
        // rank < i}, from an OR scan over the experts in rank order
        __shared__ long long sl[512];
        __shared__ int order[512];
        __shared__ unsigned wtot[8][W];
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
            for (int f = 0; f < E; ++f) n += sl[f] > le;
            rank[e] = n;
            if (le >= 0) {
                order[n] = e;
                atomicAdd(&accessed, 1);
            }
        }
        __syncthreads();
        const int A = accessed, warp = threadIdx.x >> 5;
        unsigned carry[W];
#pragma unroll
        for (int w = 0; w < W; ++w) carry[w] = 0u;
        if (threadIdx.x < W) rb[threadIdx.x] = 0u;
        for (int base = 0; base < E; base += blockDim.x) {  // block-uniform
            const int n = base + threadIdx.x;
            unsigned v[W];
#pragma unroll
            for (int w = 0; w < W; ++w) v[w] = 0u;
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
                for (int j = 0; j < (int)(blockDim.x >> 5); ++j) {
                    if (j < warp) v[w] |= wtot[j][w];
                    all |= wtot[j][w];
                }
                v[w] |= carry[w];
                carry[w] = all;
                if (n < E) rb[(long long)(n + 1) * W + w] = v[w];
            }
            __syncthreads();
        }
        return;
    }
    const int warp = threadIdx.x >> 5;
    const long long chunk = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    const long long r = chunk * 32 + lane;
    const bool in = r < T;
    if (chunk * 32 >= T) return;  // whole warps
    __shared__ unsigned socc[8][512];  // this warp's chunk: records (lane bits) holding each expert
    for (int e = lane; e < E; e += 32) socc[warp][e] = 0u;
    __syncwarp();
    unsigned bits[W];
#pragma unroll
    for (int w = 0; w < W; ++w) bits[w] = 0u;
    if (in) {
        for (int s = 0; s < k; ++s) {
            const int e = ds4_load_index(ids, idx_kind, ioff + r * i_rs + s * i_cs);
            if (e >= 0 && e < E) {
                ds4_add_expert<W>(bits, e);
                atomicOr(&socc[warp][e], 1u << lane);
            }
        }
        // adjacency snapshot for the first record of a run of one sequence
        const long long sq = ds4_seq_of(seq, seq64, r);
        const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
        if (first && sq >= 0 && sq < num_seqs) {
            snap_pos[r] = prev_pos[sq];
            for (int s = 0; s < k; ++s) snap_ids[r * k + s] = prev_ids[sq * k + s];
        }
    }
    // suffix ORs within the chunk (records r .. chunk end) and the chunk's OR
#pragma unroll
    for (int w = 0; w < W; ++w) {
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned u = __shfl_down_sync(0xffffffffu, bits[w], off);
            if (lane + off < 32) bits[w] |= u;
        }
        if (lane == 0) chunkbits[chunk * W + w] = bits[w];
    }
    if (in) {  // each lane its whole row: 16-byte stores where rows are (W*4 = 16, 32, 64 bytes)
        if constexpr (W % 4 == 0) {
#pragma unroll
            for (int w = 0; w < W; w += 4)
                *reinterpret_cast<uint4*>(srow + r * W + w) =
                    make_uint4(bits[w], bits[w + 1], bits[w + 2], bits[w + 3]);
        } else {
#pragma unroll
            for (int w = 0; w < W; ++w) srow[r * W + w] = bits[w];
        }
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32) occ[chunk * E + e] = socc[warp][e];
}

// acc |= OR of the block's records [a, b] (local, a <= b): two rows of the sparse table
template <int W>
__device__ __forceinline__ void ds4_or_range(unsigned (&acc)[W], const unsigned* tab, int RB, int a, int b) {
    const int l = 31 - __clz(b - a + 1);
    const unsigned* x = tab + ((long long)l * RB + a) * W;
    const unsigned* y = tab + ((long long)l * RB + b - (1 << l) + 1) * W;
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] |= x[w] | y[w];
}

template <int W>
__global__ void __launch_bounds__(256, 3)  // three blocks per SM (shared memory ~70 kB each)
locality_accumulate(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls,
                    const float* __restrict__ weights, long long w_rs, long long w_cs, long long w_ls, long long T,
                    int k, int E, const void* __restrict__ pos, int pos64, long long pos_base,
                    const void* __restrict__ seq, int seq64, long long num_seqs, long long clock,
                    long long* __restrict__ last, int parity, const unsigned* __restrict__ srow,
                    const unsigned* __restrict__ chunkbits, const unsigned* __restrict__ occ,
                    const unsigned* __restrict__ rb, const int* __restrict__ rank,
                    const long long* __restrict__ snap_pos, const int* __restrict__ snap_ids,
                    long long* __restrict__ prev_pos, int* __restrict__ prev_ids,
                    unsigned long long* __restrict__ hist, double* __restrict__ wsum,
                    unsigned long long* __restrict__ dist, double* __restrict__ wdist,
                    unsigned long long* __restrict__ adj, int adj_len, int layer0, int RB) {
    // shared memory (sizes: ds4kern.recorder._accumulate_smem): counters, then the block's chunk
    // occupancy masks, ids, the sparse table of its records' bitsets (log2(RB) levels), each
    // slot's prefix set within its record, and which records repeat no id
    extern __shared__ __align__(16) unsigned char smem[];
    double* s_wsum = reinterpret_cast<double*>(smem);
    double* s_wdist = s_wsum + E;
    long long* s_last = reinterpret_cast<long long*>(s_wdist + E + 1);
    unsigned* s_hist = reinterpret_cast<unsigned*>(s_last + E);
    unsigned* s_dist = s_hist + E;
    unsigned* s_adj = s_dist + E + 1;
    unsigned* s_zrow = s_adj + adj_len;
    unsigned* s_occ = s_zrow + W;
    int* s_ids = reinterpret_cast<int*>(s_occ + (RB / 32) * E);
    unsigned* s_tab = reinterpret_cast<unsigned*>(s_ids + RB * k);
    unsigned* s_ps = s_tab + (31 - __clz(RB)) * RB * W;  // [RB][k][W]: experts of slots 0 .. j-1
    int* s_free = reinterpret_cast<int*>(s_ps + RB * k * W);  // record without a repeated id
    unsigned* s_sfx = reinterpret_cast<unsigned*>(s_free + RB);  // [2][DS4_LOC_WIN][W]: see below

    const int tid = threadIdx.x, nt = blockDim.x;
    const float rk = 1.0f / (float)k;
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long R0 = (long long)blockIdx.x * RB;
    const int nrec = (int)min((long long)RB, T - R0);
    const long long cb = R0 / 32;  // the block's first chunk (RB is a multiple of 32)
    const int nch = (nrec + 31) / 32;
    const long long ioff = li * i_ls;
    if (weights != nullptr) weights += li * w_ls;
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer<W>(li, layer, T, E, k, num_seqs, last, parity, last_cur, last_next, srow, chunkbits, occ, rb, rank,
                    snap_pos, snap_ids, prev_pos, prev_ids);
    hist += layer * E;
    wsum += layer * E;
    dist += layer * (E + 1);
    wdist += layer * (E + 1);
    adj += layer * adj_len;

    for (int e = tid; e < E; e += nt) {
        s_wsum[e] = 0.0;
        s_last[e] = -1;
        s_hist[e] = 0u;
    }
    for (int d = tid; d <= E; d += nt) {
        s_wdist[d] = 0.0;
        s_dist[d] = 0u;
    }
    for (int t = tid; t < adj_len; t += nt) s_adj[t] = 0u;
    if (tid < W) s_zrow[tid] = 0u;
    for (int t = tid; t < nch * E; t += nt) s_occ[t] = occ[cb * E + t];
    for (int t = tid; t < nrec * k; t += nt) {
        const int i = ds4_div(t, k, rk), j = t - i * k;
        const int e = ds4_load_index(ids, idx_kind, ioff + (R0 + i) * i_rs + j * i_cs);
        s_ids[t] = (e >= 0 && e < E) ? e : -1;
    }
    __syncthreads();
    {  // s_zrow = OR of the step's chunks before this block
        unsigned z[W];
#pragma unroll
        for (int w = 0; w < W; ++w) z[w] = 0u;
        for (long long c = tid; c < cb; c += nt) ds4_or_into<W>(z, chunkbits + c * W);
#pragma unroll
        for (int w = 0; w < W; ++w)
            if (z[w]) atomicOr(&s_zrow[w], z[w]);
    }
    // the ORs of chunks c .. cb - 1 for the DS4_LOC_WIN chunks c before the block (a doubling
    // suffix scan, two buffers): whole chunks between an earlier record and the block in one row
    const long long cw0 = cb > DS4_LOC_WIN ? cb - DS4_LOC_WIN : 0;
    const int nw = (int)(cb - cw0);
    for (int t = tid; t < nw * W; t += nt) s_sfx[t] = chunkbits[cw0 * W + t];
    int buf = 0;
    for (int off = 1; off < nw; off <<= 1) {  // block-uniform
        __syncthreads();
        const unsigned* src = s_sfx + buf * DS4_LOC_WIN * W;
        unsigned* dst = s_sfx + (buf ^ 1) * DS4_LOC_WIN * W;
        for (int t = tid; t < nw * W; t += nt) dst[t] = src[t] | (t + off * W < nw * W ? src[t + off * W] : 0u);
        buf ^= 1;
    }
    const unsigned* sfx = s_sfx + buf * DS4_LOC_WIN * W;  // row c - cw0: chunks c .. cb - 1
    for (int i = tid; i < nrec; i += nt) {  // level 0: the records' bitsets, and their slot prefixes
        unsigned bits[W];
#pragma unroll
        for (int w = 0; w < W; ++w) bits[w] = 0u;
        int nvalid = 0;
        for (int j = 0; j < k; ++j) {
#pragma unroll
            for (int w = 0; w < W; ++w) s_ps[(i * k + j) * W + w] = bits[w];
            const int e = s_ids[i * k + j];
            if (e >= 0) {
                ds4_add_expert<W>(bits, e);
                ++nvalid;
            }
        }
#pragma unroll
        for (int w = 0; w < W; ++w) s_tab[i * W + w] = bits[w];
        s_free[i] = ds4_popc<W>(bits) == nvalid;
    }
    __syncthreads();
    for (int l = 1; (1 << l) < nrec; ++l) {  // level l: OR of records i .. i + 2^l - 1
        const int h = 1 << (l - 1);
        const unsigned* src = s_tab + (long long)(l - 1) * RB * W;
        unsigned* dst = s_tab + (long long)l * RB * W;
        for (int t = tid; t < nrec * W; t += nt) {
            const int i = t / W;
            dst[t] = src[t] | (i + h < nrec ? src[t + h * W] : 0u);
        }
        __syncthreads();
    }

    // one thread per access
    for (int t = tid; t < nrec * k; t += nt) {
        const int e = s_ids[t];
        if (e < 0) continue;
        const int i = ds4_div(t, k, rk), j = t - i * k;
        const long long r = R0 + i;
        const int* rec = s_ids + i * k;
        unsigned acc[W];  // the experts of the earlier slots
#pragma unroll
        for (int w = 0; w < W; ++w) acc[w] = s_ps[t * W + w];
        int d;
        if (ds4_has_expert<W>(acc, e)) {
            // e is in an earlier slot too: the distinct experts in the slots since its latest one
            int same = -1;
            for (int jj = 0; jj < j; ++jj)
                if (rec[jj] == e) same = jj;
#pragma unroll
            for (int w = 0; w < W; ++w) acc[w] = 0u;
            for (int jj = same + 1; jj < j; ++jj)
                if (rec[jj] >= 0) ds4_add_expert<W>(acc, rec[jj]);
            d = ds4_popc<W>(acc);
        } else {
            // the latest earlier record of this block holding e (chunk masks: one load per chunk)
            int pl = -1;
            const int ci = i >> 5;
            unsigned m = s_occ[ci * E + e] & ((1u << (i & 31)) - 1u);
            if (m) {
                pl = ci * 32 + 31 - __clz(m);
            } else {
                for (int c = ci - 1; c >= 0; --c) {
                    m = s_occ[c * E + e];
                    if (m) {
                        pl = c * 32 + 31 - __clz(m);
                        break;
                    }
                }
            }
            if (pl >= 0) {
                if (pl + 1 <= i - 1) ds4_or_range<W>(acc, s_tab, RB, pl + 1, i - 1);
                const int* prec = s_ids + pl * k;  // its slots after e's last slot there
                int ls = -1;
                for (int jj = 0; jj < k; ++jj)
                    if (prec[jj] == e) ls = jj;
                if (s_free[pl]) {  // no repeated id: the record's set less its slots 0 .. ls
                    if (ls + 1 < k) {
                        const unsigned* row = s_tab + pl * W;
                        const unsigned* pre = s_ps + (pl * k + ls + 1) * W;
#pragma unroll
                        for (int w = 0; w < W; ++w) acc[w] |= row[w] & ~pre[w];
                    }
                } else {
                    for (int jj = ls + 1; jj < k; ++jj)
                        if (prec[jj] >= 0) ds4_add_expert<W>(acc, prec[jj]);
                }
                d = ds4_popc<W>(acc);
            } else {
                if (i > 0) ds4_or_range<W>(acc, s_tab, RB, 0, i - 1);  // the block's records before r
                // the latest earlier chunk of the step holding e: 8 independent loads per round
                long long pc = -1;
                unsigned pm = 0u;
                for (long long c = cb - 1; c >= 0 && pc < 0; c -= 8) {
                    unsigned mm[8];
#pragma unroll
                    for (int u = 0; u < 8; ++u) mm[u] = c - u >= 0 ? occ[(c - u) * E + e] : 0u;
#pragma unroll
                    for (int u = 0; u < 8; ++u)
                        if (pc < 0 && mm[u]) {
                            pc = c - u;
                            pm = mm[u];
                        }
                }
                if (pc >= 0) {
                    const int b = 31 - __clz(pm);
                    const long long p = pc * 32 + b;
                    if (b < 31) ds4_or_into<W>(acc, srow + (p + 1) * W);  // the rest of chunk pc
                    // whole chunks up to the block: the window's row, and before it 8 a round
                    if (pc + 1 < cb) ds4_or_into<W>(acc, sfx + max(pc + 1 - cw0, 0LL) * W);
                    for (long long c2 = pc + 1; c2 < cw0; c2 += 8) {
                        const int n = (int)min(8LL, cw0 - c2);
#pragma unroll
                        for (int u = 0; u < 8; ++u)
                            if (u < n) ds4_or_into<W>(acc, chunkbits + (c2 + u) * W);
                    }
                    int ls = -1;
                    for (int jj = 0; jj < k; ++jj)
                        if (ds4_load_index(ids, idx_kind, ioff + p * i_rs + jj * i_cs) == e) ls = jj;
                    for (int jj = ls + 1; jj < k; ++jj) {
                        const int f = ds4_load_index(ids, idx_kind, ioff + p * i_rs + jj * i_cs);
                        if (f >= 0 && f < E) ds4_add_expert<W>(acc, f);
                    }
                    d = ds4_popc<W>(acc);
                } else {
                    const long long le = last_cur[e];
                    const int re = rank[e];  // loaded beside le, not after it
                    if (le >= 0) {
                        // not in this step: the experts used since e's last access before it
                        ds4_or_into<W>(acc, s_zrow);
                        ds4_or_into<W>(acc, rb + (long long)re * W);
                        d = ds4_popc<W>(acc);
                    } else {
                        d = E;  // never seen before: a miss at every cache size
                    }
                }
            }
        }
        atomicAdd(&s_hist[e], 1u);
        atomicAdd(&s_dist[d], 1u);
        if (weights != nullptr) {
            const double wt = (double)weights[r * w_rs + j * w_cs];
            atomicAdd(&s_wsum[e], wt);
            atomicAdd(&s_wdist[d], wt);
        }
        atomicMax(&s_last[e], clock + r * k + j);
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
            // A = the previous record's ids: snapshot, this block, or the ids array
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

    // the block's counters into the layer's
    for (int e = tid; e < E; e += nt) {
        if (s_hist[e]) {
            atomicAdd(&hist[e], (unsigned long long)s_hist[e]);
            if (weights != nullptr) atomicAdd(&wsum[e], s_wsum[e]);
        }
        if (s_last[e] >= 0) atomicMax(&last_next[e], s_last[e]);
    }
    for (int d = tid; d <= E; d += nt)
        if (s_dist[d]) {
            atomicAdd(&dist[d], (unsigned long long)s_dist[d]);
            if (weights != nullptr) atomicAdd(&wdist[d], s_wdist[d]);
        }
    for (int t = tid; t < adj_len; t += nt)
        if (s_adj[t]) atomicAdd(&adj[t], (unsigned long long)s_adj[t]);
}
