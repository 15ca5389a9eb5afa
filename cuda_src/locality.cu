// locality.cu — online expert-locality recording (issue: locality profiler): two launches per
// call, no host synchronisation.  A call covers one layer or several layers of one step (grid y =
// the layer within the call: its ids / weights at i_ls / w_ls elements apart, its scratch rows;
// layer0 + y = the recorder's layer, whose state and counters it updates).
//
// locality_prepare<W>: W = ceil(E / 32) words per expert bitset.  Warps own chunks of 32 records:
// lane = record; each builds its record's bitset (recbits [T, W]) and the warp ORs them into the
// chunk's (chunkbits [ceil(T/32), W]).  First records of a run of one sequence snapshot that
// sequence's previous record (its position and ids) before the second kernel overwrites it.  The
// last block of each layer ranks the experts by their last access before this step (rank 0 = most
// recent) and writes rb[i] = the set of experts of rank < i (an OR scan over the experts in rank
// order), so "experts used since e's last access" is one row; it also carries `last` into the
// next step's buffer.
//
// locality_accumulate<W>: one warp per record, lane = slot.  Per access: histogram and weight sum;
// the LRU stack distance (distinct experts since the previous access of the same expert, in record
// order then slot order): earlier slots of the record (shuffled from the other lanes), then a
// backward walk over the step's records (skipping whole chunks that lack the expert, ORing what it
// passes, 8 independent row loads per round), else the ranks of the previous steps; per record:
// the adjacency with the previous record of its sequence (intersection / union histogram,
// same-slot matches).  Counters are integers (exact, order-free); weight sums are float64 atomics.
//
// Bytes per layer and step: the ids (T*k*sizeof(index)) read twice, the weights once, T*W*4
// bitsets written and re-read from L2, a few counters.
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

template <int W>
__global__ void __launch_bounds__(256)
locality_prepare(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls, long long T,
                 int k, int E, const void* __restrict__ seq, int seq64, long long num_seqs,
                 const long long* __restrict__ prev_pos, const int* __restrict__ prev_ids, long long* __restrict__ last,
                 int parity, unsigned* __restrict__ recbits, unsigned* __restrict__ chunkbits, unsigned* __restrict__ rb,
                 int* __restrict__ rank, long long* __restrict__ snap_pos, int* __restrict__ snap_ids, int chunk_blocks,
                 int layer0) {
    const int lane = threadIdx.x & 31;
    // blockIdx.y: the layer within this call (scratch, ids); layer0 + blockIdx.y: the recorder's layer (state)
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long chunks = (T + 31) / 32;
    const long long ioff = li * i_ls;  // ids of this layer
    prev_pos += layer * num_seqs;
    prev_ids += layer * num_seqs * k;
    const long long* last_cur = last + layer * 2 * E + parity * E;
    long long* last_next = last + layer * 2 * E + (1 - parity) * E;
    recbits += li * T * W;
    chunkbits += li * chunks * W;
    rb += layer * (E + 1) * W;
    rank += layer * E;
    snap_pos += li * T;
    snap_ids += li * T * k;
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
    const long long chunk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long r = chunk * 32 + lane;
    const bool in = r < T && chunk * 32 < T;
    if (chunk * 32 >= T) return;  // whole warps
    unsigned bits[W];
#pragma unroll
    for (int w = 0; w < W; ++w) bits[w] = 0u;
    if (in) {
        for (int s = 0; s < k; ++s) {
            const int e = ds4_load_index(ids, idx_kind, ioff + r * i_rs + s * i_cs);
            if (e >= 0 && e < E) ds4_add_expert<W>(bits, e);
        }
#pragma unroll
        for (int w = 0; w < W; ++w) recbits[r * W + w] = bits[w];
        // adjacency snapshot for the first record of a run of one sequence
        const long long sq = ds4_seq_of(seq, seq64, r);
        const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
        if (first && sq >= 0 && sq < num_seqs) {
            snap_pos[r] = prev_pos[sq];
            for (int s = 0; s < k; ++s) snap_ids[r * k + s] = prev_ids[sq * k + s];
        }
    }
#pragma unroll
    for (int w = 0; w < W; ++w) {
        unsigned v = bits[w];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) chunkbits[chunk * W + w] = v;
    }
}

// acc |= rows[0], rows[-step], ... for the first n (< 8) of them: independent, predicated loads
template <int W>
__device__ __forceinline__ void ds4_or_rows(unsigned (&acc)[W], const unsigned* __restrict__ row, long long step, int n) {
#pragma unroll
    for (int u = 0; u < 8; ++u)
        if (u < n) ds4_or_into<W>(acc, row - u * step);
}

template <int W>
__global__ void __launch_bounds__(256, 4)  // a register budget: ptxas for sm_80 spilled W=1 at 48
locality_accumulate(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls,
                    const float* __restrict__ weights, long long w_rs, long long w_cs, long long w_ls, long long T,
                    int k, int E, const void* __restrict__ pos, int pos64, long long pos_base,
                    const void* __restrict__ seq, int seq64, long long num_seqs, long long clock,
                    long long* __restrict__ last, int parity, const unsigned* __restrict__ recbits,
                    const unsigned* __restrict__ chunkbits, const unsigned* __restrict__ rb,
                    const int* __restrict__ rank, const long long* __restrict__ snap_pos,
                    const int* __restrict__ snap_ids, long long* __restrict__ prev_pos, int* __restrict__ prev_ids,
                    unsigned long long* __restrict__ hist, double* __restrict__ wsum,
                    unsigned long long* __restrict__ dist, double* __restrict__ wdist,
                    unsigned long long* __restrict__ adj, int adj_len, int layer0) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= T) return;  // whole warps
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long chunks = (T + 31) / 32;
    const long long ioff = li * i_ls;
    if (weights != nullptr) weights += li * w_ls;
    const long long* last_cur = last + layer * 2 * E + parity * E;
    long long* last_next = last + layer * 2 * E + (1 - parity) * E;
    recbits += li * T * W;
    chunkbits += li * chunks * W;
    rb += layer * (E + 1) * W;
    rank += layer * E;
    snap_pos += li * T;
    snap_ids += li * T * k;
    prev_pos += layer * num_seqs;
    prev_ids += layer * num_seqs * k;
    hist += layer * E;
    wsum += layer * E;
    dist += layer * (E + 1);
    wdist += layer * (E + 1);
    adj += layer * adj_len;

    const bool slot = lane < k;
    const int e = slot ? ds4_load_index(ids, idx_kind, ioff + r * i_rs + lane * i_cs) : -1;
    const bool valid = slot && e >= 0 && e < E;
    const float wt = (weights != nullptr && slot) ? weights[r * w_rs + lane * w_cs] : 0.0f;
    const unsigned vmask = __ballot_sync(0xffffffffu, valid);
    // the latest earlier slot of this record with the same expert, and the valid experts in the
    // slots between it (or the record's start) and this one: from the other lanes' registers
    int same = -1;
    for (int j = 0; j < k; ++j) {
        const int f = __shfl_sync(0xffffffffu, e, j);
        if (j < lane && f == e) same = j;
    }
    unsigned acc[W];
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = 0u;
    for (int j = 0; j < k; ++j) {
        const int f = __shfl_sync(0xffffffffu, e, j);
        if (j > same && j < lane && ((vmask >> j) & 1u)) ds4_add_expert<W>(acc, f);
    }

    if (valid) {
        atomicAdd(&hist[e], 1ull);
        if (weights != nullptr) atomicAdd(&wsum[e], (double)wt);
        int d;
        if (same >= 0) {
            d = ds4_popc<W>(acc);
        } else {
            // walk back over the step's records, 8 independent loads per round: first the records
            // of r's own chunk, then whole chunks (8 chunk sets per round), then inside the chunk
            // that holds e
            long long found = -1;
            long long q = r - 1;
            const int ew = e >> 5;
            const unsigned eb = 1u << (e & 31);
            while (q >= 0 && found < 0) {
                const bool in_chunk = (q & 31) != 31;  // q is not the last record of a whole chunk
                if (in_chunk) {
                    // records q, q-1, ... down to the start of q's chunk (at most 8 this round)
                    const long long lo = max(q - 7, q & ~31LL);
                    unsigned hit = 0u;
#pragma unroll
                    for (int u = 0; u < 8; ++u)
                        if (q - u >= lo && (recbits[(q - u) * W + ew] & eb)) hit |= 1u << u;
                    const int stop = hit ? __ffs(hit) - 1 : (int)(q - lo) + 1;  // records passed
                    ds4_or_rows<W>(acc, recbits + q * W, W, stop);
                    if (hit) found = q - stop;
                    q -= stop;
                    continue;
                }
                // whole chunks ending at q: up to 8 per round
                const long long c = q >> 5;
                unsigned hit = 0u;
                const int nc = (int)min(8LL, c + 1);
#pragma unroll
                for (int u = 0; u < 8; ++u)
                    if (u < nc && (chunkbits[(c - u) * W + ew] & eb)) hit |= 1u << u;
                const int stop = hit ? __ffs(hit) - 1 : nc;  // whole chunks passed
                ds4_or_rows<W>(acc, chunkbits + c * W, W, stop);
                q -= 32LL * stop;
                if (hit) {
                    // e is in chunk c - stop, whose last record is q: search it record by record
                    while (found < 0) {
                        unsigned h2 = 0u;  // the chunk is whole and holds e: q - u stays inside it
#pragma unroll
                        for (int u = 0; u < 8; ++u)
                            if (recbits[(q - u) * W + ew] & eb) h2 |= 1u << u;
                        const int st2 = h2 ? __ffs(h2) - 1 : 8;
                        ds4_or_rows<W>(acc, recbits + q * W, W, st2);
                        if (h2) found = q - st2;
                        q -= st2;
                    }
                }
            }
            if (found >= 0) {
                // slots of record `found` after e's last slot there
                int ls = -1;
                for (int j = 0; j < k; ++j)
                    if (ds4_load_index(ids, idx_kind, ioff + found * i_rs + j * i_cs) == e) ls = j;
                for (int j = ls + 1; j < k; ++j) {
                    const int f = ds4_load_index(ids, idx_kind, ioff + found * i_rs + j * i_cs);
                    if (f >= 0 && f < E) ds4_add_expert<W>(acc, f);
                }
                d = ds4_popc<W>(acc);
            } else if (last_cur[e] >= 0) {
                ds4_or_into<W>(acc, rb + (long long)rank[e] * W);
                d = ds4_popc<W>(acc);
            } else {
                d = E;  // never seen before: a miss at every cache size
            }
        }
        atomicAdd(&dist[d], 1ull);
        if (weights != nullptr) atomicAdd(&wdist[d], (double)wt);
        atomicMax(&last_next[e], clock + r * k + lane);
    }

    // adjacency with the previous record of the same sequence
    const long long sq = ds4_seq_of(seq, seq64, r);
    if (sq < 0 || sq >= num_seqs) return;  // warp-uniform
    const long long p = ds4_pos_of(pos, pos64, pos_base, r);
    const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
    const long long pp = first ? snap_pos[r] : ds4_pos_of(pos, pos64, pos_base, r - 1);
    const bool last_of_seq = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
    if (pp == p - 1) {
        const int a = slot ? (first ? snap_ids[r * k + lane]
                                    : ds4_load_index(ids, idx_kind, ioff + (r - 1) * i_rs + lane * i_cs))
                           : -1;
        const bool va = slot && a >= 0 && a < E;
        bool dupA = false, dupB = false, aInB = false;
        for (int j = 0; j < k; ++j) {
            const int aj = __shfl_sync(0xffffffffu, a, j);
            const int bj = __shfl_sync(0xffffffffu, e, j);
            if (j < lane) {
                dupA |= aj == a;
                dupB |= bj == e;
            }
            aInB |= ((vmask >> j) & 1u) && bj == a;
        }
        const bool firstA = va && !dupA, firstB = valid && !dupB;
        const int inter = __popc(__ballot_sync(0xffffffffu, firstA && aInB));
        const int na = __popc(__ballot_sync(0xffffffffu, firstA));
        const int nb = __popc(__ballot_sync(0xffffffffu, firstB));
        const int eq = __popc(__ballot_sync(0xffffffffu, va && valid && a == e));
        if (lane == 0) {
            atomicAdd(&adj[0], 1ull);
            atomicAdd(&adj[1], (unsigned long long)eq);
            atomicAdd(&adj[2 + inter * (2 * k + 1) + (na + nb - inter)], 1ull);
        }
    }
    if (last_of_seq) {
        if (lane == 0) prev_pos[sq] = p;
        if (slot) prev_ids[sq * k + lane] = e;
    }
}
