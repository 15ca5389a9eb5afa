// Device helpers of the MoE permute kernels (permute.cu): loading an expert id, the per-warp
// counting and stable placement over a contiguous range of flat entries, error counting and a
// block-wide exclusive scan.
//
// Stability: a warp walks its range 32 entries at a time, in order.  Lanes holding the same
// expert find each other with __match_any_sync; a lane's rank among them is the number of
// lower lanes in its group, and the group's leader (lowest lane) advances the expert's cursor
// by the group size.  Entries of one expert thus land in ascending flat order, within a warp and,
// because warps' cursors start at the counts of all earlier ranges, across warps and blocks.
#pragma once
#include "../common/common.cuh"

#define DS4_MOE_MAX_EXPERTS 1024
#define DS4_MOE_FULL 0xffffffffu

// The expert of a raw id: itself inside [0, E), else -1 ("no expert", or an id outside [0, E),
// which the counting pass reports).
__device__ __forceinline__ int moe_valid(int e, int E) { return (e >= 0 && e < E) ? e : -1; }

// Counts the valid entries of [begin, end) per expert into hist[E] (this warp's own row in
// shared memory).  begin and end are uniform across the warp; every lane calls it.  Returns
// this lane's number of bad ids when count_bad is set.
__device__ __forceinline__ int moe_warp_count(const int* __restrict__ idx, int begin, int end, int E, int* hist,
                                              bool count_bad) {
    const int lane = threadIdx.x & 31;
    int bad = 0;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const int raw = i < end ? __ldg(idx + i) : -1;
        const int e = moe_valid(raw, E);
        if (count_bad) bad += (raw < -1 || raw >= E);
        const unsigned peers = __match_any_sync(DS4_MOE_FULL, e);
        if (e >= 0 && lane == __ffs(peers) - 1) hist[e] += __popc(peers);
        __syncwarp();
    }
    return bad;
}

// Stable placement of [begin, end): cursor[e] (this warp's row) holds the permuted row of the
// warp's next entry of expert e.  Writes order[pos] = i and slot[i] = pos, slot[i] = -1 for a
// skipped entry.
__device__ __forceinline__ void moe_warp_place(const int* __restrict__ idx, int begin, int end, int E, int* cursor,
                                               int* __restrict__ order, int* __restrict__ slot) {
    const int lane = threadIdx.x & 31;
    const unsigned lower = (1u << lane) - 1u;
    for (int base = begin; base < end; base += 32) {
        const int i = base + lane;
        const int e = i < end ? moe_valid(__ldg(idx + i), E) : -1;
        const unsigned peers = __match_any_sync(DS4_MOE_FULL, e);
        if (i < end) {
            if (e >= 0) {
                const int pos = cursor[e] + __popc(peers & lower);
                order[pos] = i;
                slot[i] = pos;
            } else {
                slot[i] = -1;
            }
        }
        __syncwarp();  // every lane has read its cursor before the leader moves it
        if (e >= 0 && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
        __syncwarp();
    }
}

// Adds a warp's bad-id count to *errors (one atomic per warp that saw any).  Every lane calls it.
__device__ __forceinline__ void moe_report(int bad, int* errors) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_xor_sync(DS4_MOE_FULL, bad, off);
    if (errors != nullptr && bad > 0 && (threadIdx.x & 31) == 0) atomicAdd(errors, bad);
}

// out[i] = v[0] + ... + v[i-1] for i <= n (out[n]: the total).  v and out in shared memory,
// distinct; warp_sums: 32 ints of shared scratch.  Every thread of the block calls it; it ends
// with a barrier.
template <int NT>
__device__ __forceinline__ void moe_block_scan(const int* v, int n, int* out, int* warp_sums) {
    static_assert(NT % 32 == 0 && NT <= 1024, "whole warps, at most 32");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per = (n + NT - 1) / NT;
    const int lo = min(n, (int)threadIdx.x * per), hi = min(n, lo + per);
    int own = 0;
    for (int i = lo; i < hi; ++i) own += v[i];
    int inc = own;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(DS4_MOE_FULL, inc, off);
        if (lane >= off) inc += o;
    }
    if (lane == 31) warp_sums[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const int w = lane < NT / 32 ? warp_sums[lane] : 0;
        int wi = w;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int o = __shfl_up_sync(DS4_MOE_FULL, wi, off);
            if (lane >= off) wi += o;
        }
        warp_sums[lane] = wi - w;
    }
    __syncthreads();
    int run = warp_sums[warp] + inc - own;
    for (int i = lo; i < hi; ++i) {
        out[i] = run;
        run += v[i];
    }
    if (threadIdx.x == NT - 1) out[n] = run;  // the last thread's exclusive prefix plus its own: the total
    __syncthreads();
}
