// The rows router top-k (compact form), one thread per token: the building blocks shared by
// router_topk_rows (rows.cu) and its group-limited form router_topk_rows_grouped (rows_grouped.cu);
// the per-token steps below are ds4_rows_tile (rows_tile.cuh).
//
// Scores: sigmoid or sqrtsoftplus (+ bias), E % 8 == 0, E <= 256, rows 16-byte aligned (the host
// checks all of it).  LPT lanes per token (1 or 2; 2 needs E % 16 == 0): with 2, each lane takes
// every other chunk, the two lanes' sorted chunk bounds merge (one bitonic step) into the exact
// k-th largest, and their exact lists merge the same way on (key, expert) at the end.
//
// Why one thread per token: the warp-per-token kernels spend ~600 warp instructions per token,
// most of them on cross-lane reductions (k rounds of warp max, compaction, shuffles) that do one
// token's work per instruction.  Here every instruction does 32 tokens' work and there are no
// cross-lane steps at all; what is left is the scoring, which is per value anyway.
//
// Thread layout: blocks of DS4_ROWS_WARPS warps, one tile of 32 / LPT tokens per warp.  Lane r of
// a warp takes token 32 * warp + r (LPT = 1) and reads its row straight from global memory in
// 16-byte loads (a warp's rows share L1 lines between consecutive chunks; a shared-memory tile
// filled with cp.async was measured slower: it caps the warps per SM, bench/lab/NOTEBOOK.md):
//   1. the row in chunks of 8 experts.  Each chunk yields a lower bound L of its best score:
//      without bias the screened score of its largest logit (score functions are increasing),
//      with bias the largest screened score + bias of its 8 experts (the bias reorders a chunk).
//      The k-th largest L, tau, is reached by at least k experts (one per chunk), so every top-k
//      expert scores at least tau - eps, and its screened score is at least tau - 2 eps;
//   2. only chunks whose L can reach that (L >= tau - 4 eps without bias, where the chunk's
//      other experts are not screened; tau - 2 eps with bias) are screened expert by expert, and
//      the experts at or above tau - 2 eps become candidates (a per-lane list in shared memory,
//      usually k + 1);
//   3. the candidates are scored exactly (the precise functions, as the reference) and kept in a
//      sorted register list of k (order key, expert, unbiased score): larger key first; as
//      candidates come in expert order and an equal key goes after the entries already there,
//      the lower expert stays first on ties.
// Screening uses the fast approximations of the warp kernels (DS4_SIG_* / DS4_SSP_*, tested by
// the probes); eps bounds their error at the scores that matter: ABS + REL * (2 |tau| + max
// |bias|) (the function's own value is at most |s| + |bias|).  Rows where tau is not finite (NaN
// chunks, infinities) or with more than CAP candidates (heavy ties) take the exact path over
// every expert: same keys, same order, same result, slower.
// Weights: as the other kernels (unbiased scores of the winners, normalised when k > 1, scaled).
//
// Bytes moved: T*E*sizeof(T) read once (+E*4 bias per block), T*k*(4 + sizeof(index)) written.
#pragma once
#include "../common/common.cuh"
#include "router_common.cuh"

#define DS4_ROWS_WARPS 2     // warps per block (one tile of 32 / LPT tokens each)
#define DS4_ROWS_MINB 8      // blocks per SM for __launch_bounds__ (without a count ptxas spilled at 64-72 registers)
#define DS4_ROWS_MAX_CH 32   // chunks of 8 experts: E <= 256

// A 16-byte read-only load with an L2 prefetch-size hint of 128 bytes where PF = 128 (else none).
// With the hint an L2 miss brings the rest of the 128-byte line along (the lane pair's later
// chunks of the row): float32 rows 2-3% faster at T >= 65536 on an H100, bfloat16 rows ~1.5%
// slower (bench/lab/NOTEBOOK.md), so only float32 rows take it.
template <int PF>
__device__ __forceinline__ uint4 ds4_ldg_hint(const uint4* q) {
    uint4 v;
    if constexpr (PF == 128)
        asm("ld.global.nc.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(q));
    else v = __ldg(q);
    return v;
}

// A lane's row in global memory (read-only path; the chunks of one warp's 32 rows share L1 lines).
template <typename T>
struct Ds4Row {
    const T* p;

    static constexpr int RAW = sizeof(T) == 4 ? 2 : 1;  // 16-byte loads per chunk of 8
    static constexpr int PF = sizeof(T) == 4 ? 128 : 0;  // L2 prefetch hint of the chunk loads
    static constexpr int PD = sizeof(T) == 4 ? 8 : 4;  // chunks in flight in step 1: 256 / 64 bytes per lane

    // the raw bytes of chunk h (issued now, used later: loads in flight while other work runs)
    __device__ __forceinline__ void raw(int h, uint4 (&r)[RAW]) const {
        const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int i = 0; i < RAW; ++i) r[i] = ds4_ldg_hint<PF>(q + RAW * h + i);
    }
    static __device__ __forceinline__ void unpack(const uint4 (&r)[RAW], float (&x)[8]) {
#pragma unroll
        for (int i = 0; i < RAW; ++i) ds4_unpack16<T, 8>(r[i], i, x);
    }
    // the 8 logits of chunk h
    __device__ __forceinline__ void chunk(int h, float (&x)[8]) const {
        uint4 r[RAW];
        raw(h, r);
        unpack(r, x);
    }
};

template <int SF>
__device__ __forceinline__ float ds4_screen(float x) {
    return SF == DS4_SF_SIGMOID ? ds4_sigmoid_approx(x) : ds4_sqrtsoftplus_approx(x);
}

// Insert (key, e, u) into the sorted list (larger key first; an equal key goes after the entries
// already there, so with entries inserted in expert order the lower expert stays first on ties).
// The entries from the insertion point on move down one place as a block: an entry pushed down
// is never compared again (comparing it would put it behind later entries of an equal key).
template <int KMAX>
__device__ __forceinline__ void ds4_list_insert(unsigned (&kk)[KMAX], int (&ke)[KMAX], float (&ku)[KMAX],
                                                unsigned key, int e, float u) {
    bool c[KMAX];  // c[j]: the new entry goes at j or above (monotone: the list is sorted)
#pragma unroll
    for (int j = 0; j < KMAX; ++j) c[j] = key > kk[j];
#pragma unroll
    for (int j = KMAX - 1; j > 0; --j) {
        kk[j] = c[j] ? (c[j - 1] ? kk[j - 1] : key) : kk[j];
        ke[j] = c[j] ? (c[j - 1] ? ke[j - 1] : e) : ke[j];
        ku[j] = c[j] ? (c[j - 1] ? ku[j - 1] : u) : ku[j];
    }
    kk[0] = c[0] ? key : kk[0];
    ke[0] = c[0] ? e : ke[0];
    ku[0] = c[0] ? u : ku[0];
}

// Key order of list entries: larger key first, lower expert on ties.
__device__ __forceinline__ bool ds4_entry_before(unsigned ka, int ea, unsigned kb, int eb) {
    return ka > kb || (ka == kb && ea < eb);
}

// Insert v into a list sorted largest first (the smallest falls off; NaN must be mapped first).
template <int N>
__device__ __forceinline__ void ds4_insert_desc(float (&l)[N], float v) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float tv = l[j];
        l[j] = fmaxf(tv, v);
        v = fminf(tv, v);
    }
}

// The group score's key from both lanes' top two keys (the lanes of `pair`): the top m <= 2 of the
// four, their values added largest first, as the reference does.
__device__ __forceinline__ unsigned ds4_pair_group_key(unsigned k0, unsigned k1, unsigned pair, int m) {
    const unsigned o0 = __shfl_xor_sync(pair, k0, 1);
    const unsigned o1 = __shfl_xor_sync(pair, k1, 1);
    const float a = ds4_key_value(max(k0, o0));
    const float sum = m == 1 ? a : a + ds4_key_value(max(min(k0, o0), max(k1, o1)));
    return ds4_order_key(sum);
}

__device__ __forceinline__ float ds4_max8(const float (&x)[8]) {
    return fmaxf(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])), fmaxf(fmaxf(x[4], x[5]), fmaxf(x[6], x[7])));
}

// The bias of chunk h's 8 experts from the block's shared-memory table (two 16-byte reads).
__device__ __forceinline__ void ds4_chunk_bias(const float* sb, int h, float (&bb)[8]) {
    const float4 b0 = *reinterpret_cast<const float4*>(sb + 8 * h);
    const float4 b1 = *reinterpret_cast<const float4*>(sb + 8 * h + 4);
    bb[0] = b0.x; bb[1] = b0.y; bb[2] = b0.z; bb[3] = b0.w;
    bb[4] = b1.x; bb[5] = b1.y; bb[6] = b1.z; bb[7] = b1.w;
}

// Exact group scores of a token's row, as the reference computes them (the keys of each group's top
// m experts, their values added largest first), and the top group_topk groups by those (larger
// key first, lower group on ties): the kept-group mask.  Both lanes of the token call it together
// (LPT == 2; each has cpl chunks of every group); sgs is the lane's column of group keys.
// `finite`: every kept group's score is a number (else experts outside them may be selected).
template <typename T, int SF, int LPT>
__device__ __forceinline__ unsigned ds4_rows_exact_groups(const Ds4Row<T>& row, const float* sb, float* sgs, int lane,
                                                          int q, int E, int cpl, int m, int num_groups,
                                                          int group_topk, bool& finite) {
    const unsigned pair = 3u << (lane & ~1);
    unsigned k0 = 0u, k1 = 0u;  // the lane's top two keys of the current group
    int c = 0, g = 0;
#pragma unroll 2
    for (int h = q; h < E / 8; h += LPT) {
        float x[8];
        row.chunk(h, x);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const unsigned key = ds4_order_key(ds4_unbiased<SF>(x[j]) + sb[8 * h + j]);
            k1 = max(k1, min(k0, key));
            k0 = max(k0, key);
        }
        if (++c == cpl) {
            sgs[g * 32 + lane] = __uint_as_float(ds4_pair_group_key(k0, k1, pair, m));
            k0 = k1 = 0u;
            c = 0;
            ++g;
        }
    }
    unsigned kept = 0u;
    finite = true;
    for (int g2 = 0; g2 < num_groups; ++g2) {
        const unsigned gk = __float_as_uint(sgs[g2 * 32 + lane]);
        int r = 0;
        for (int o = 0; o < num_groups; ++o) {
            const unsigned ok = __float_as_uint(sgs[o * 32 + lane]);
            r += (ok > gk || (ok == gk && o < g2)) ? 1 : 0;
        }
        if (r < group_topk) {
            kept |= 1u << g2;
            finite = finite && fabsf(ds4_key_value(gk)) < __int_as_float(0x7f800000);
        }
    }
    return kept;
}

// The block's bias table and max |bias| in shared memory (every thread of the block; two barriers).
__device__ __forceinline__ void ds4_rows_bias_table(const float* __restrict__ bias, int E, float* sb, unsigned* sbabs,
                                                    int nthreads) {
    if (threadIdx.x == 0) *sbabs = 0u;
    __syncthreads();
    float ab = 0.0f;
    for (int e = threadIdx.x; e < E; e += nthreads) {
        const float b = bias != nullptr ? bias[e] : 0.0f;
        sb[e] = b;
        ab = fmaxf(ab, fabsf(b));
    }
    atomicMax(sbabs, __float_as_uint(ab));  // non-negative floats order as their bits
    __syncthreads();
}

// Candidates per lane (grouped: 2 x 16 group rows share the table).
template <int KMAX, bool GROUPED>
__host__ __device__ constexpr int ds4_rows_cap() { return KMAX + (GROUPED ? 24 : 16); }
