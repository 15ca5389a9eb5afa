// topk_rows, hist variant: many blocks per row, global digit histograms, one sort of the winners.
//
// Each row is cut into slices of DS4_TOPK_HIST_SLICE columns, one block of 256 threads per slice
// (grid: rows x slices, flattened).  The k-th largest key is found digit by digit, most
// significant first, over three rounds (bits 31-21, 20-10, 9-0: 2048, 2048 and 1024 bins):
//   round r (topk_hist_round): every block counts the digit of the keys of its slice that match
//     the prefix known so far in a shared-memory histogram and adds its non-zero bins to the row's
//     global histogram; the row's last block (atomic counter) reads and clears that histogram,
//     finds the bin that holds the k-th largest and writes the row's state: the longer prefix, how
//     many keys of the bin still win, and the status (1: every key of the bin wins, 2: all 32 bits
//     are known and more keys equal the cut than win: the lowest columns win, 0: another round).
//     Later rounds of a settled row return at once.
//   topk_hist_ties (only rows of status 2): each block counts its keys equal to the cut.
//   topk_hist_collect: each block appends its winners (keys above the cut; keys equal to it
//     where status 1; the lowest-column ones where status 2, ranked with the counts of the blocks
//     before) as 64-bit words key << 32 | ~column to the row's candidate list (atomic counter).
//   topk_hist_sort: one block per row sorts the kk = min(k, valid) candidates (bitonic) and writes
//     their columns, -1 beyond.
// Reads each row two to five times (rounds 0-2, the ties pass on status-2 rows, the collect; all but
// the first mostly from L2 at the sizes it is for); six launches and a memset.
//
// Row state (int32 [R, 8], zeroed before round 0): 0 prefix bits, 1 the lowest known bit, 2 keys
// equal to the prefix (on the known bits) that still win, 3 status, 4 kk, 5 candidates written,
// 6 blocks done with the current round.  Histogram: uint32 [R, 2048], zeroed before round 0 and
// left zeroed by every round.
#include "topk_common.cuh"

#define DS4_TOPK_HIST_THREADS 256
#define DS4_TOPK_HIST_PER 16
#define DS4_TOPK_HIST_SLICE (DS4_TOPK_HIST_THREADS * DS4_TOPK_HIST_PER)
#define DS4_TOPK_HIST_BINS 2048
#define DS4_TOPK_HIST_STATE 8

// The row's length after the lengths check (a bad length is clamped; counted once, in round 0).
__device__ __forceinline__ int ds4_topk_hist_len(const int* __restrict__ lengths, long long row, int cols,
                                                 bool count, int* __restrict__ errors) {
    if (lengths == nullptr) return cols;
    int len = lengths[row];
    if (len < 0 || len > cols) {
        if (count && errors != nullptr) atomicAdd(errors, 1);
        len = min(max(len, 0), cols);
    }
    return len;
}

// Columns of the slice starting at column c0 that lie within the row's length.
__device__ __forceinline__ int ds4_topk_hist_count(int len, long long c0) {
    const long long left = (long long)len - c0;
    return left <= 0 ? 0 : (left < DS4_TOPK_HIST_SLICE ? (int)left : DS4_TOPK_HIST_SLICE);
}

// Round r's digit: bits [lo, lo + width) of the key, lo = 21 / 10 / 0; keys take part when their
// bits above lo + width equal the prefix's.
__device__ __forceinline__ int ds4_topk_hist_lo(int r) { return r == 0 ? 21 : (r == 1 ? 10 : 0); }
__device__ __forceinline__ int ds4_topk_hist_width(int r) { return r == 2 ? 10 : 11; }

__device__ __forceinline__ bool ds4_topk_hist_matches(unsigned key, unsigned prefix, int known) {
    return known >= 32 || (key >> known) == (prefix >> known);
}

// The row's last block: reads and clears the global histogram, picks the cut bin, writes the state.
__device__ void ds4_topk_hist_select(int r, int k, unsigned* __restrict__ ghist, int* __restrict__ st,
                                     unsigned* h) {
    const int lo = ds4_topk_hist_lo(r), nb = 1 << ds4_topk_hist_width(r);
    for (int b = threadIdx.x; b < nb; b += DS4_TOPK_HIST_THREADS) h[b] = atomicExch(&ghist[b], 0u);
    __syncthreads();
    if (threadIdx.x < 32) {
        // lane l covers bins [nb - (l + 1) * per, nb - l * per), scanned from the top
        const int lane = threadIdx.x, per = nb / 32;
        const int top = nb - lane * per;
        unsigned sum = 0;  // (rotated by lane: the 32 lanes read 32 different banks)
        for (int i = 0; i < per; ++i) sum += h[top - per + ((i + lane) & (per - 1))];
        unsigned incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        const unsigned total = __shfl_sync(0xffffffffu, incl, 31);
        int need, kk;
        if (r == 0) {
            kk = total < (unsigned)k ? (int)total : k;
            need = kk;
        } else {
            kk = st[4];
            need = st[2];
        }
        const unsigned above = incl - sum;  // keys in the bins above this lane's
        const bool mine = need > 0 && above < (unsigned)need && (unsigned)need <= incl;
        const unsigned who = __ballot_sync(0xffffffffu, mine);
        if (need <= 0) {
            if (lane == 0) {  // no valid key (round 0 only): nothing to take
                st[1] = lo;
                st[2] = 0;
                st[3] = 1;
                st[4] = kk;
            }
        } else if (lane == __ffs(who) - 1) {
            unsigned a = above;
            int b = top - 1;
            while (a + h[b] < (unsigned)need) a += h[b--];
            const unsigned prefix = (unsigned)st[0] | ((unsigned)b << lo);
            const int left = need - (int)a;
            st[0] = (int)prefix;
            st[1] = lo;
            st[2] = left;
            st[3] = h[b] == (unsigned)left ? 1 : (r == 2 ? 2 : 0);
            st[4] = kk;
        }
        if (lane == 0) st[6] = 0;  // the next round's block counter
    }
}

template <typename T>
__global__ void __launch_bounds__(DS4_TOPK_HIST_THREADS)
topk_hist_round(const T* __restrict__ scores, long long row_stride, int cols, const int* __restrict__ lengths,
                int slices, int k, int r, unsigned* __restrict__ hist, int* __restrict__ state,
                int* __restrict__ errors) {
    __shared__ unsigned h[DS4_TOPK_HIST_BINS];
    __shared__ int s_last;
    const long long row = blockIdx.x / slices;
    const int slice = (int)(blockIdx.x % slices);
    int* st = state + row * DS4_TOPK_HIST_STATE;
    if (r > 0 && st[3] != 0) return;  // settled in an earlier round (the whole row returns)
    const int len = ds4_topk_hist_len(lengths, row, cols, r == 0 && slice == 0 && threadIdx.x == 0, errors);
    const int lo = ds4_topk_hist_lo(r), nb = 1 << ds4_topk_hist_width(r);
    const int known = lo + ds4_topk_hist_width(r);
    const unsigned prefix = r > 0 ? (unsigned)st[0] : 0u;
    for (int b = threadIdx.x; b < nb; b += DS4_TOPK_HIST_THREADS) h[b] = 0u;
    __syncthreads();
    const long long c0 = (long long)slice * DS4_TOPK_HIST_SLICE;
    const T* src = scores + row * row_stride + c0;
    const int n = ds4_topk_hist_count(len, c0);
    unsigned key[DS4_TOPK_HIST_PER];
#pragma unroll
    for (int j = 0; j < DS4_TOPK_HIST_PER; ++j) {
        const int i = threadIdx.x + j * DS4_TOPK_HIST_THREADS;
        key[j] = i < n ? ds4_topk_order(ds4_topk_float(src[i])) : 0u;
    }
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < DS4_TOPK_HIST_PER; ++j) {
        // one shared atomic per distinct bin of the warp (long runs of equal keys would serialise)
        const bool in = key[j] != 0u && ds4_topk_hist_matches(key[j], prefix, known);
        const unsigned bin = in ? (key[j] >> lo) & (unsigned)(nb - 1) : 0xffffffffu;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (in && lane == __ffs(peers) - 1) atomicAdd(&h[bin], (unsigned)__popc(peers));
    }
    __syncthreads();
    unsigned* ghist = hist + row * DS4_TOPK_HIST_BINS;
    for (int b = threadIdx.x; b < nb; b += DS4_TOPK_HIST_THREADS)
        if (h[b] != 0u) atomicAdd(&ghist[b], h[b]);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(&st[6], 1) == slices - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    ds4_topk_hist_select(r, k, ghist, st, h);
}

// Status-2 rows: the keys of each slice equal to the cut, in ties[row * slices + slice].
template <typename T>
__global__ void __launch_bounds__(DS4_TOPK_HIST_THREADS)
topk_hist_ties(const T* __restrict__ scores, long long row_stride, int cols, const int* __restrict__ lengths,
               int slices, const int* __restrict__ state, int* __restrict__ ties) {
    __shared__ unsigned s_cnt;
    const long long row = blockIdx.x / slices;
    const int slice = (int)(blockIdx.x % slices);
    const int* st = state + row * DS4_TOPK_HIST_STATE;
    if (st[3] != 2) return;
    const int len = ds4_topk_hist_len(lengths, row, cols, false, nullptr);
    const unsigned cut = (unsigned)st[0];
    if (threadIdx.x == 0) s_cnt = 0u;
    __syncthreads();
    const long long c0 = (long long)slice * DS4_TOPK_HIST_SLICE;
    const T* src = scores + row * row_stride + c0;
    const int n = ds4_topk_hist_count(len, c0);
    unsigned c = 0;
#pragma unroll
    for (int j = 0; j < DS4_TOPK_HIST_PER; ++j) {
        const int i = threadIdx.x + j * DS4_TOPK_HIST_THREADS;
        c += i < n && ds4_topk_order(ds4_topk_float(src[i])) == cut;
    }
    if (c) atomicAdd(&s_cnt, c);
    __syncthreads();
    if (threadIdx.x == 0) ties[row * slices + slice] = (int)s_cnt;
}

// Appends this lane's word (if `take`) to the row's candidates (at most k): one atomic per warp.
__device__ __forceinline__ void ds4_topk_hist_append(bool take, unsigned key, int col, int* __restrict__ count,
                                                     unsigned long long* __restrict__ cand, int k) {
    const unsigned m = __ballot_sync(0xffffffffu, take);
    if (m == 0u) return;
    const int lane = threadIdx.x & 31, leader = __ffs(m) - 1;
    int base = 0;
    if (lane == leader) base = atomicAdd(count, __popc(m));
    base = __shfl_sync(0xffffffffu, base, leader);
    const int at = base + __popc(m & ((1u << lane) - 1u));
    if (take && at < k) cand[at] = ds4_topk_word(key, (unsigned)col);
}

template <typename T>
__global__ void __launch_bounds__(DS4_TOPK_HIST_THREADS)
topk_hist_collect(const T* __restrict__ scores, long long row_stride, int cols, const int* __restrict__ lengths,
                  int slices, int k, int* __restrict__ state, const int* __restrict__ ties,
                  unsigned long long* __restrict__ cand) {
    __shared__ unsigned s_warp[DS4_TOPK_HIST_THREADS / 32];
    __shared__ int s_before;
    const long long row = blockIdx.x / slices;
    const int slice = (int)(blockIdx.x % slices);
    int* st = state + row * DS4_TOPK_HIST_STATE;
    const unsigned cut = (unsigned)st[0];
    const int known = st[1], status = st[3];
    const int len = ds4_topk_hist_len(lengths, row, cols, false, nullptr);
    const long long c0 = (long long)slice * DS4_TOPK_HIST_SLICE;
    const T* src = scores + row * row_stride + c0;
    const int n = ds4_topk_hist_count(len, c0);
    unsigned long long* out = cand + row * k;
    int need = 0;
    if (status == 2) {  // the tie keys of the slices before this one rank first
        if (threadIdx.x == 0) s_before = 0;
        __syncthreads();
        int b = 0;
        for (int s = threadIdx.x; s < slice; s += DS4_TOPK_HIST_THREADS) b += ties[row * slices + s];
        if (b) atomicAdd(&s_before, b);
        __syncthreads();
        need = st[2] - s_before;  // tie keys of this slice that still win (may be <= 0)
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll 4
    for (int j = 0; j < DS4_TOPK_HIST_PER; ++j) {
        const int i = threadIdx.x + j * DS4_TOPK_HIST_THREADS;  // columns in (j, thread) order
        const unsigned key = i < n ? ds4_topk_order(ds4_topk_float(src[i])) : 0u;
        const unsigned hi = known >= 32 ? 0u : key >> known, chi = known >= 32 ? 0u : cut >> known;
        bool take = key != 0u && hi > chi;
        bool tie = key != 0u && hi == chi;
        if (status == 1) {
            take = take || tie;
        } else if (need > 0) {  // status 2 (all bits known): rank this j's ties in column order
            const unsigned m = __ballot_sync(0xffffffffu, tie);
            if (lane == 0) s_warp[warp] = __popc(m);
            __syncthreads();
            int rank = __popc(m & ((1u << lane) - 1u));
            int all = 0;
            for (int w = 0; w < DS4_TOPK_HIST_THREADS / 32; ++w) {
                rank += w < warp ? (int)s_warp[w] : 0;
                all += (int)s_warp[w];
            }
            take = take || (tie && rank < need);
            need -= all;
            __syncthreads();
        }
        ds4_topk_hist_append(take, key, (int)(c0 + i), &st[5], out, k);
    }
}

// One block of DS4_TOPK_THREADS per row: sort the kk candidates, write the columns (-1 beyond).
__global__ void __launch_bounds__(DS4_TOPK_THREADS)
topk_hist_sort(const unsigned long long* __restrict__ cand, const int* __restrict__ state, int k,
               int* __restrict__ out) {
    __shared__ unsigned long long w[DS4_TOPK_MAX_K];
    const long long row = blockIdx.x;
    const int* st = state + row * DS4_TOPK_HIST_STATE;
    const int kk = min(st[4], st[5]);  // (equal by construction; never sort unwritten words)
    const int n2 = ds4_topk_pow2(kk > 0 ? kk : 1);
    for (int j = threadIdx.x; j < n2; j += DS4_TOPK_THREADS) w[j] = j < kk ? cand[row * k + j] : 0ull;
    __syncthreads();
    if (n2 > 1) ds4_topk_bitonic_desc(w, n2);
    for (int j = threadIdx.x; j < k; j += DS4_TOPK_THREADS)
        out[row * k + j] = j < kk ? (int)ds4_topk_word_pos(w[j]) : -1;
}
