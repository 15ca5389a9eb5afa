// Online expert-locality recording, shared by its two kernels (prepare.cu, then accumulate.cu on
// the same stream; no host synchronisation).  A call covers one layer or several layers of one
// step (grid y = the layer within the call: its ids / weights at i_ls / w_ls elements apart, its
// scratch rows; layer0 + y = the recorder's layer, whose state and counters it updates).
//
// An access is (record r, slot j) with a valid id; its key r * k + j orders the call's accesses.
// The LRU stack distance of an access to e is the number of distinct experts accessed since the
// previous access to e (E if e was never accessed): e's rank in the LRU stack, 0 = most recent.
// The call's records are cut into parts of P records, GP = 8 consecutive parts per block (one warp
// each); E <= 32 W.
//
// Bytes per layer and step: the ids read once (by prepare, which writes them as int16 for itself
// and for accumulate: 2 bytes per slot written and read back from L2), the weights once, per part
// 4 E bytes of pcum (and per block 4 E of bmax) written and read back from L2, a few counters.
#pragma once
#include "../common/common.cuh"

#define DS4_LOC_GP 8  // parts per block (warps)

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

