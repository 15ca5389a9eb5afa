// topk_rows, radix variant: radix select over keys staged in shared memory.
//
// One block takes one chunk of PER * 512 keys: a row's columns (topk_radix_rows) or a run of the
// candidates an earlier level kept (topk_radix_merge).  The keys are loaded once (coalesced) into
// shared memory, where each thread then owns PER consecutive keys (padding one word per 32 keeps
// both the stores and the per-thread reads free of bank conflicts).  Then:
//   1. cut: 8-bit digit histograms, most significant digit first, narrow the k-th largest key
//      down until its bin holds exactly the keys still needed (or all 32 bits are known);
//   2. compact: one block-wide scan of (equal, greater) counts places every winner in position
//      order; among keys equal to the cut, the lowest positions win (ties to the lower column);
//   3. emit: the last level sorts the winners (bitonic, 64-bit words) and writes their columns,
//      -1 beyond; an earlier level writes its winners' (key, column) pairs, in column order,
//      padded with key 0 / column -1, for the next level to merge.
#include "topk_common.cuh"

struct Ds4TopkCut {
    unsigned prefix;  // the cut's known high bits
    int shift;        // bits below `shift` are not resolved
    int need;         // how many keys equal to the cut (in the resolved bits) still win
    int kk;           // winners in all: min(k, valid keys)
};

struct Ds4TopkSmem {
    unsigned* stage;
    unsigned long long* win;
    unsigned* hist;
    unsigned long long* wsum;
    unsigned* scal;
};

template <int PER>
__device__ __forceinline__ Ds4TopkSmem ds4_topk_smem(unsigned char* base) {
    constexpr int CH = PER * DS4_TOPK_THREADS;
    Ds4TopkSmem s;
    s.stage = reinterpret_cast<unsigned*>(base);
    s.win = reinterpret_cast<unsigned long long*>(s.stage + CH + CH / 32);
    s.hist = reinterpret_cast<unsigned*>(s.win + DS4_TOPK_MAX_K);
    s.wsum = reinterpret_cast<unsigned long long*>(s.hist + DS4_TOPK_BINS);
    s.scal = reinterpret_cast<unsigned*>(s.wsum + DS4_TOPK_WARPS);
    return s;
}

// Key j of this thread's run [t * PER, (t + 1) * PER) of the staged chunk.
template <int PER>
__device__ __forceinline__ unsigned ds4_topk_key(const unsigned* stage, int j) {
    const int i = threadIdx.x * PER + j;
    return stage[i + (i >> 5)];
}

template <int PER>
__device__ Ds4TopkCut ds4_topk_cut(int k, const Ds4TopkSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned cnt = 0;
#pragma unroll 8
    for (int j = 0; j < PER; ++j) cnt += ds4_topk_key<PER>(sm.stage, j) != 0u;
    unsigned long long total;
    ds4_topk_block_scan(cnt, sm.wsum, total);
    Ds4TopkCut c;
    c.kk = total < (unsigned long long)k ? (int)total : k;
    c.prefix = 0u;
    c.shift = 0;
    c.need = 0;
    if (total <= (unsigned long long)k) return c;  // every valid key wins (block-uniform)
    c.need = k;
    for (int s = 24; s >= 0; s -= 8) {
        if (threadIdx.x < DS4_TOPK_BINS) sm.hist[threadIdx.x] = 0u;
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < PER; ++j) {
            const unsigned kj = ds4_topk_key<PER>(sm.stage, j);
            const bool in = kj != 0u && (s == 24 || (kj >> (s + 8)) == (c.prefix >> (s + 8)));
            const unsigned d = in ? (kj >> s) & 255u : 256u;
            const unsigned peers = __match_any_sync(0xffffffffu, d);
            if (in && lane == __ffs(peers) - 1) atomicAdd(&sm.hist[d], (unsigned)__popc(peers));
        }
        __syncthreads();
        // Counts from the top bin down: thread t < 256 takes bin 255 - t (8 whole warps).
        unsigned h = 0u, incl = 0u;
        if (threadIdx.x < DS4_TOPK_BINS) {
            h = sm.hist[DS4_TOPK_BINS - 1 - threadIdx.x];
            incl = h;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            if (lane == 31) sm.scal[warp] = incl;
        }
        __syncthreads();
        if (threadIdx.x < DS4_TOPK_BINS) {
            for (int w = 0; w < warp; ++w) incl += sm.scal[w];
            const unsigned need = (unsigned)c.need;
            if (incl >= need && incl - h < need) {
                sm.scal[8] = DS4_TOPK_BINS - 1 - threadIdx.x;
                sm.scal[9] = incl - h;
                sm.scal[10] = h;
            }
        }
        __syncthreads();
        const unsigned bin = sm.scal[8], above = sm.scal[9], in_bin = sm.scal[10];
        __syncthreads();  // scal is written again next round
        c.prefix |= bin << s;
        c.need -= (int)above;
        c.shift = s;
        if (in_bin == (unsigned)c.need) break;  // the whole bin wins
    }
    return c;
}

// Writes the winners to sm.win in position order; returns how many (c.kk).
template <int PER>
__device__ int ds4_topk_compact(const Ds4TopkCut& c, const Ds4TopkSmem& sm) {
    const unsigned cut = c.prefix >> c.shift, need = (unsigned)c.need;
    unsigned gt = 0u, eq = 0u;
#pragma unroll 8
    for (int j = 0; j < PER; ++j) {
        const unsigned kj = ds4_topk_key<PER>(sm.stage, j), hi = kj >> c.shift;
        gt += kj != 0u && hi > cut;
        eq += kj != 0u && hi == cut;
    }
    unsigned long long total;
    const unsigned long long before = ds4_topk_block_scan(((unsigned long long)eq << 32) | gt, sm.wsum, total);
    unsigned eq_before = (unsigned)(before >> 32);
    unsigned pos = (unsigned)(before & 0xffffffffull) + min(eq_before, need);
#pragma unroll 8
    for (int j = 0; j < PER; ++j) {
        const unsigned kj = ds4_topk_key<PER>(sm.stage, j), hi = kj >> c.shift;
        bool take = kj != 0u && hi > cut;
        if (kj != 0u && hi == cut) take = eq_before++ < need;
        if (take) sm.win[pos++] = ds4_topk_word(kj, threadIdx.x * PER + j);
    }
    __syncthreads();
    return c.kk;
}

// cols: the columns of the chunk's positions (nullptr: column = c0 + position).
template <bool FINAL>
__device__ __forceinline__ void ds4_topk_emit(const Ds4TopkSmem& sm, int kk, int k, long long slot,
                                              long long c0, const int* __restrict__ cols,
                                              unsigned* __restrict__ cand_key, int* __restrict__ cand_col,
                                              int* __restrict__ out) {
    if (FINAL) {
        const int n2 = ds4_topk_pow2(kk > 0 ? kk : 1);
        for (int j = kk + threadIdx.x; j < n2; j += DS4_TOPK_THREADS) sm.win[j] = 0ull;
        __syncthreads();
        if (n2 > 1) ds4_topk_bitonic_desc(sm.win, n2);
    }
    for (int j = threadIdx.x; j < k; j += DS4_TOPK_THREADS) {
        int col = -1;
        unsigned key = 0u;
        if (j < kk) {
            const unsigned long long w = sm.win[j];
            const unsigned p = ds4_topk_word_pos(w);
            col = cols ? cols[p] : (int)(c0 + p);
            key = (unsigned)(w >> 32);
        }
        if (FINAL) {
            out[slot * k + j] = col;
        } else {
            cand_key[slot * k + j] = key;
            cand_col[slot * k + j] = col;
        }
    }
}

// Grid: rows * chunks blocks (block b: row b / chunks, chunk b % chunks).  FINAL: chunks == 1 and
// the block writes out[row, 0:k]; else candidate slot (row * chunks + chunk) of k pairs.
template <typename T, int PER, bool FINAL>
__global__ void __launch_bounds__(DS4_TOPK_THREADS)
topk_radix_rows(const T* __restrict__ scores, long long row_stride, int cols, const int* __restrict__ lengths,
                int chunks, int k, unsigned* __restrict__ cand_key, int* __restrict__ cand_col,
                int* __restrict__ out, int* __restrict__ errors) {
    constexpr int CH = PER * DS4_TOPK_THREADS;
    extern __shared__ __align__(16) unsigned char ds4_topk_shared[];
    const Ds4TopkSmem sm = ds4_topk_smem<PER>(ds4_topk_shared);
    const long long row = blockIdx.x / chunks;
    const int chunk = blockIdx.x % chunks;
    int len = cols;
    if (lengths != nullptr) {
        len = lengths[row];
        if (len < 0 || len > cols) {
            if (errors != nullptr && chunk == 0 && threadIdx.x == 0) atomicAdd(errors, 1);
            len = min(max(len, 0), cols);
        }
    }
    const long long c0 = (long long)chunk * CH;
    const long long left = (long long)len - c0;
    const int n = left <= 0 ? 0 : (left < CH ? (int)left : CH);
    const T* src = scores + row * row_stride + c0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int i = threadIdx.x + j * DS4_TOPK_THREADS;
        sm.stage[i + (i >> 5)] = i < n ? ds4_topk_order(ds4_topk_float(src[i])) : 0u;
    }
    __syncthreads();
    const Ds4TopkCut c = ds4_topk_cut<PER>(k, sm);
    const int kk = ds4_topk_compact<PER>(c, sm);
    ds4_topk_emit<FINAL>(sm, kk, k, (long long)blockIdx.x, c0, nullptr, cand_key, cand_col, out);
}

// Merges candidate lists: row r's n_in candidates (chunk-major from the level before, each run
// in column order) in chunks of PER * 512; same grid and outputs as topk_radix_rows.
template <int PER, bool FINAL>
__global__ void __launch_bounds__(DS4_TOPK_THREADS)
topk_radix_merge(const unsigned* __restrict__ in_key, const int* __restrict__ in_col, int n_in, int chunks, int k,
                 unsigned* __restrict__ cand_key, int* __restrict__ cand_col, int* __restrict__ out) {
    constexpr int CH = PER * DS4_TOPK_THREADS;
    extern __shared__ __align__(16) unsigned char ds4_topk_shared[];
    const Ds4TopkSmem sm = ds4_topk_smem<PER>(ds4_topk_shared);
    const long long row = blockIdx.x / chunks;
    const int chunk = blockIdx.x % chunks;
    const long long c0 = (long long)chunk * CH;
    const long long left = (long long)n_in - c0;
    const int n = left <= 0 ? 0 : (left < CH ? (int)left : CH);
    const unsigned* src = in_key + row * n_in + c0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int i = threadIdx.x + j * DS4_TOPK_THREADS;
        sm.stage[i + (i >> 5)] = i < n ? src[i] : 0u;
    }
    __syncthreads();
    const Ds4TopkCut c = ds4_topk_cut<PER>(k, sm);
    const int kk = ds4_topk_compact<PER>(c, sm);
    ds4_topk_emit<FINAL>(sm, kk, k, (long long)blockIdx.x, c0, in_col + row * n_in + c0, cand_key, cand_col, out);
}
