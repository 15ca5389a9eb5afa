// moe_permute's permutation: a stable counting sort of the n = T * k flat entries of indices
// [T, k] by expert.  Outputs: counts [E], offsets [E + 1] (exclusive prefix sums of counts),
// order [n] (permuted row -> flat entry, -1 from offsets[E] on) and slot [n] (flat entry ->
// permuted row, -1 for skipped entries).  An id of -1 is skipped; any other id outside [0, E)
// is skipped too and added to *errors (if given).  No atomics decide a position: the result is
// the same on every run.
//
// single_block: one block of NT threads (NT / 32 warps).  Warp w owns a contiguous range of the
// entries; pass 1 counts each warp's range per expert into its own row of a [warps][E] table in
// shared memory, a prefix over the rows and a block scan over experts turn the table into each
// warp's starting row per expert, and pass 2 places the entries (moe_common.cuh).
//
// chunked: the same over many blocks.  moe_permute_count: block c counts chunk c (its warps'
// ranges of DS4_MOE_SUB entries each) into counts_cx [C][E] in global memory.
// moe_permute_scan (one block): the exclusive prefix of counts_cx over chunks, per expert (in
// place), the totals, their scan.  moe_permute_place: block c counts its warps' ranges again,
// starts each at offsets[e] + counts_cx[c][e] plus the earlier warps' counts, and places them.
//
// Bytes: indices read twice (4 n each), order and slot written once (8 n); chunked also writes
// and reads C * E ints of chunk counts.
#include "moe_common.cuh"

#define DS4_MOE_SUB 128  // entries per warp range in the chunked kernels

// Column prefix of a [W][E] table in shared memory: table[w][e] = start + sum over w' < w;
// tot[e] = the column's sum (when tot is not null).
template <int NT, int W>
__device__ __forceinline__ void moe_warp_prefix(int* table, int E, const int* start, int* tot) {
    for (int e = threadIdx.x; e < E; e += NT) {
        int run = start != nullptr ? start[e] : 0;
        const int first = run;
#pragma unroll 4
        for (int w = 0; w < W; ++w) {
            const int c = table[w * E + e];
            table[w * E + e] = run;
            run += c;
        }
        if (tot != nullptr) tot[e] = run - first;
    }
}

template <int NT>
__global__ void __launch_bounds__(NT)
moe_permute_single_block(const int* __restrict__ idx, int n, int E, int* __restrict__ counts,
                         int* __restrict__ offsets, int* __restrict__ order, int* __restrict__ slot,
                         int* __restrict__ errors) {
    constexpr int W = NT / 32;
    extern __shared__ int smem[];
    int* table = smem;             // [W][E]: counts, then starting rows
    int* tot = table + W * E;      // [E]
    int* off = tot + E;            // [E + 1]
    __shared__ int warp_sums[32];
    for (int i = threadIdx.x; i < W * E; i += NT) table[i] = 0;
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    const int per = ((n + W - 1) / W + 31) & ~31;  // whole 32-entry steps
    const int begin = min(n, warp * per), end = min(n, begin + per);
    int* row = table + warp * E;
    const int bad = moe_warp_count(idx, begin, end, E, row, true);
    moe_report(bad, errors);
    __syncthreads();
    moe_warp_prefix<NT, W>(table, E, nullptr, tot);
    __syncthreads();
    moe_block_scan<NT>(tot, E, off, warp_sums);
    for (int e = threadIdx.x; e <= E; e += NT) {
        offsets[e] = off[e];
        if (e < E) counts[e] = tot[e];
    }
    for (int i = threadIdx.x; i < W * E; i += NT) table[i] += off[i % E];
    __syncthreads();
    moe_warp_place(idx, begin, end, E, row, order, slot);
    for (int p = off[E] + threadIdx.x; p < n; p += NT) order[p] = -1;
}

// The range of warp `warp` of chunk `chunk` (NT / 32 ranges of DS4_MOE_SUB entries per chunk).
template <int NT>
__device__ __forceinline__ void moe_chunk_range(int n, int& begin, int& end) {
    const long long b = ((long long)blockIdx.x * (NT / 32) + (threadIdx.x >> 5)) * DS4_MOE_SUB;
    begin = (int)min((long long)n, b);
    end = (int)min((long long)n, b + DS4_MOE_SUB);
}

template <int NT>
__global__ void __launch_bounds__(NT)
moe_permute_count(const int* __restrict__ idx, int n, int E, int* __restrict__ counts_cx, int* __restrict__ errors) {
    constexpr int W = NT / 32;
    extern __shared__ int smem[];
    int* table = smem;  // [W][E]
    for (int i = threadIdx.x; i < W * E; i += NT) table[i] = 0;
    __syncthreads();
    int begin, end;
    moe_chunk_range<NT>(n, begin, end);
    const int bad = moe_warp_count(idx, begin, end, E, table + (threadIdx.x >> 5) * E, true);
    moe_report(bad, errors);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += NT) {
        int s = 0;
#pragma unroll 4
        for (int w = 0; w < W; ++w) s += table[w * E + e];
        counts_cx[(long long)blockIdx.x * E + e] = s;
    }
}

template <int NT>
__global__ void __launch_bounds__(NT)
moe_permute_scan(int* __restrict__ counts_cx, int chunks, int E, int* __restrict__ counts,
                 int* __restrict__ offsets) {
    __shared__ int tot[DS4_MOE_MAX_EXPERTS];
    __shared__ int off[DS4_MOE_MAX_EXPERTS + 1];
    __shared__ int warp_sums[32];
    if (E > DS4_MOE_MAX_EXPERTS) return;  // refused on the host; never index past the tables
    for (int e = threadIdx.x; e < E; e += NT) {
        int run = 0;
        for (int c = 0; c < chunks; ++c) {
            const long long at = (long long)c * E + e;
            const int v = counts_cx[at];
            counts_cx[at] = run;
            run += v;
        }
        tot[e] = run;
    }
    __syncthreads();
    moe_block_scan<NT>(tot, E, off, warp_sums);
    for (int e = threadIdx.x; e <= E; e += NT) {
        offsets[e] = off[e];
        if (e < E) counts[e] = tot[e];
    }
}

template <int NT>
__global__ void __launch_bounds__(NT)
moe_permute_place(const int* __restrict__ idx, int n, int E, const int* __restrict__ counts_cx,
                  const int* __restrict__ offsets, int* __restrict__ order, int* __restrict__ slot) {
    constexpr int W = NT / 32;
    extern __shared__ int smem[];
    int* table = smem;          // [W][E]: this chunk's counts per warp, then starting rows
    int* start = table + W * E; // [E]: the chunk's first row per expert
    for (int i = threadIdx.x; i < W * E; i += NT) table[i] = 0;
    const int* chunk_start = counts_cx + (long long)blockIdx.x * E;
    for (int e = threadIdx.x; e < E; e += NT) start[e] = __ldg(offsets + e) + __ldg(chunk_start + e);
    __syncthreads();
    int begin, end;
    moe_chunk_range<NT>(n, begin, end);
    int* row = table + (threadIdx.x >> 5) * E;
    moe_warp_count(idx, begin, end, E, row, false);
    __syncthreads();
    moe_warp_prefix<NT, W>(table, E, start, nullptr);
    __syncthreads();
    moe_warp_place(idx, begin, end, E, row, order, slot);
    const int total = __ldg(offsets + E);
    for (long long p = total + (long long)blockIdx.x * NT + threadIdx.x; p < n; p += (long long)gridDim.x * NT)
        order[p] = -1;
}
