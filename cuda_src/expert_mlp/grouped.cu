// expert_mlp_gate_up<TN> / expert_mlp_down<TN, OUT_F32> — the routed experts' clamped SwiGLU MLPs
// over token rows grouped by expert, on tensor cores (mma.sync m16n8k16, bf16 in, float32
// accumulators), in two launches.  For each row r of expert e (offsets[e] <= r < offsets[e + 1]):
//   gate_up: h[r, i] = bf16(swiglu(x[r] . w_gate[e, i], x[r] . w_up[e, i]))      (h: [N, I] scratch)
//   down:    out[r, d] = h[r] . w_down[e, d]                                     (bf16 or float32)
//
// "Swap AB": the weights are the mma's M operand (16 output features per mma) and the rows its N
// operand (8 per mma), so an expert with a handful of rows wastes no weight bytes.
//
// Work items.  Item = (expert e, output tile, group of up to TN rows of e), ordered by expert,
// then tile, then row group (the row groups of one tile are adjacent, so blocks running side by
// side share its weights through L2).  The grid is an upper bound on the item count computed on
// the host from N, E and TN alone (no host synchronisation); block b takes item b, found by a
// block-wide scan of the offsets; blocks past the last item exit at once.
//
// Block: 128 threads, 4 warps; its weight tile is 64 rows, warp w owning rows 16w .. 16w + 15 (one
// m16 tile) for all TN rows (TN / 8 n tiles).  gate_up: rows 16w + j (j < 8) are gate feature
// f0 + 8w + j and rows 16w + 8 + j up feature f0 + 8w + j, so one thread's accumulators hold the
// gate (d0, d1) and the up (d2, d3) of the same (feature, row) and the SwiGLU needs no exchange;
// a block covers 32 features.  down: row r is output feature f0 + r; a block covers 64.
//
// Pipeline: stages of k = 64 (one 128-byte line of each weight row and of each of the TN rows of
// x or h) come into shared memory with cp.async, DS4_EM_STAGES deep.  A stage row is 128 bytes;
// its 16-byte chunk c sits at chunk c ^ 4 on odd rows, so the fragment loads below (8 lanes: two
// rows x four chunks) hit 32 distinct banks.  Fragments: lane (g = lane / 4, t = lane % 4) loads
// chunk 4 half + t of its rows (16 bytes: k = 32 half + 8t .. 8t + 7) for weight rows g, g + 8
// and for x row g of each n tile; the first 8 bytes feed one mma, the last 8 the next.  That
// assigns the 16 k of an mma to its fragment slots in another order than the PTX layout, the same
// order for A and B, so each product pairs the same k: the dot product is unchanged.
//
// Epilogue: accumulators -> float32 tile in shared memory (row pitch padded by 4 words) -> 16-byte
// stores of whole rows (h: bf16; out: bf16 or float32).  Rows beyond the group are not written.
//
// Bytes per item: 64 weight rows x K x 2 (K = D for gate_up, I for down) from HBM (or L2 when
// another row group of the same tile ran beside it), TN rows of x / h x K x 2 (L2), TN x 32 x 2
// (h) or TN x 64 x 2 / 4 (out) written.  Each touched expert's weights are read once per row group.
#include "expert_mlp_common.cuh"

template <int TN>
struct EmLayout {
    static_assert(TN == 8 || TN == 16 || TN == 32 || TN == 64, "rows per group");
    static constexpr int ROW = 128;                                         // bytes of a stage row
    static constexpr int STAGE = (DS4_EM_TILE_ROWS + TN) * ROW;             // weights, then x / h
    static constexpr int BYTES = DS4_EM_STAGES * STAGE;
    static constexpr int GU_PITCH = DS4_EM_GU_FEATURES + 4;                 // epilogue tile (floats)
    static constexpr int DOWN_PITCH = DS4_EM_TILE_ROWS + 4;
    static_assert(TN * DOWN_PITCH * 4 <= BYTES, "the epilogue tile reuses the pipeline's memory");
};

struct EmItem {
    int e, tile, row0, rows;
};

// Byte offset of 16-byte chunk `chunk` (0..7) of stage row `row`.
__device__ __forceinline__ int em_swz(int row, int chunk) { return row * 128 + ((chunk ^ ((row & 1) << 2)) << 4); }

__device__ __forceinline__ long long em_groups(int n, int TN) { return ((long long)n + TN - 1) / TN; }

// Item w of the ordered list (module note), or false when w is past its end.  Called by every
// thread of the block; thread i scans experts [i * per, i * per + per), per = ceil(E / 128) <= 8.
template <int TN>
__device__ bool em_find_item(const int* __restrict__ offsets, int E, int N, int tiles, long long w, EmItem& item) {
    __shared__ long long s_warp[DS4_EM_THREADS / 32];
    __shared__ int s_item[4];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int per = (E + DS4_EM_THREADS - 1) / DS4_EM_THREADS;
    const int e0 = min(tid * per, E), e1 = min(e0 + per, E);
    long long mine = 0;
    for (int e = e0; e < e1; ++e) {
        int lo, n;
        ds4_em_expert_rows(offsets, e, N, lo, n);
        mine += tiles * em_groups(n, TN);
    }
    long long incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const long long v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    long long base = incl - mine, total = 0;
#pragma unroll
    for (int i = 0; i < DS4_EM_THREADS / 32; ++i) {
        const long long s = s_warp[i];
        if (i < warp) base += s;
        total += s;
    }
    if (w >= total) return false;  // the same answer in every thread
    if (w >= base && w < base + mine) {
        long long acc = base;
        for (int e = e0; e < e1; ++e) {
            int lo, n;
            ds4_em_expert_rows(offsets, e, N, lo, n);
            const long long groups = em_groups(n, TN), cnt = tiles * groups;
            if (w < acc + cnt) {
                const long long r = w - acc, g = r % groups;
                s_item[0] = e;
                s_item[1] = (int)(r / groups);
                s_item[2] = lo + (int)g * TN;
                s_item[3] = min(TN, n - (int)g * TN);
                break;
            }
            acc += cnt;
        }
    }
    __syncthreads();
    item.e = s_item[0];
    item.tile = s_item[1];
    item.row0 = s_item[2];
    item.rows = s_item[3];
    return true;
}

// Weight row r (0..63) of a block tile: gate_up interleaves 8 gate and 8 up rows per warp.
template <bool GATE_UP>
__device__ __forceinline__ const __nv_bfloat16* em_weight_row(const __nv_bfloat16* w0, const __nv_bfloat16* w1,
                                                             int r, long long K) {
    if constexpr (GATE_UP) return ((r & 8) ? w1 : w0) + (long long)((r >> 4) * 8 + (r & 7)) * K;
    return w0 + (long long)r * K;
}

// Issue the copies of stage kc: 64 weight rows and `rows` rows of x / h (the rest of the TN rows
// zero-filled, nothing read for them).
template <int TN, bool GATE_UP>
__device__ __forceinline__ void em_issue_stage(unsigned char* st, const __nv_bfloat16* w0, const __nv_bfloat16* w1,
                                               long long K, const __nv_bfloat16* x, int rows, int kc) {
    const long long k0 = (long long)kc * DS4_EM_BK;
#pragma unroll
    for (int i = 0; i < DS4_EM_TILE_ROWS * 8 / DS4_EM_THREADS; ++i) {
        const int c = threadIdx.x + i * DS4_EM_THREADS, r = c >> 3, ch = c & 7;
        ds4_em_cp_async16(st + em_swz(r, ch), em_weight_row<GATE_UP>(w0, w1, r, K) + k0 + ch * 8, 16);
    }
    unsigned char* xs = st + DS4_EM_TILE_ROWS * 128;
#pragma unroll
    for (int i = 0; i < (TN * 8 + DS4_EM_THREADS - 1) / DS4_EM_THREADS; ++i) {
        const int c = threadIdx.x + i * DS4_EM_THREADS, r = c >> 3, ch = c & 7;
        if (c >= TN * 8) break;
        const bool ok = r < rows;
        ds4_em_cp_async16(xs + em_swz(r, ch), ok ? x + (long long)r * K + k0 + ch * 8 : x, ok ? 16 : 0);
    }
}

// The mma of one stage: warp w's 16 weight rows times the TN rows, k = 64 (two halves of 32).
template <int TN>
__device__ __forceinline__ void em_compute_stage(float (&acc)[TN / 8][4], const unsigned char* st, int warp,
                                                 int lane) {
    const int g = lane >> 2, t = lane & 3;
    const unsigned char* xs = st + DS4_EM_TILE_ROWS * 128;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int ch = half * 4 + t;
        const uint4 lo = *reinterpret_cast<const uint4*>(st + em_swz(16 * warp + g, ch));
        const uint4 hi = *reinterpret_cast<const uint4*>(st + em_swz(16 * warp + g + 8, ch));
#pragma unroll
        for (int nt = 0; nt < TN / 8; ++nt) {
            const uint4 b = *reinterpret_cast<const uint4*>(xs + em_swz(nt * 8 + g, ch));
            ds4_em_mma(acc[nt], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
            ds4_em_mma(acc[nt], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
        }
    }
}

// acc (zeroed here) = the block tile's 64 weight rows . the group's rows over K (rows K elements
// apart; the first `nk_part` 64-wide steps from the given pointers, all of K when negative: a
// split-K block passes pointers advanced to its part); leaves the pipeline drained and the block
// synchronised, so the caller may reuse shared memory.
template <int TN, bool GATE_UP>
__device__ __forceinline__ void em_mainloop(float (&acc)[TN / 8][4], unsigned char* smem, const __nv_bfloat16* w0,
                                            const __nv_bfloat16* w1, long long K, const __nv_bfloat16* x, int rows,
                                            int nk_part = -1) {
    using L = EmLayout<TN>;
    const int nk = nk_part < 0 ? (int)(K / DS4_EM_BK) : nk_part;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < TN / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
#pragma unroll
    for (int s = 0; s < DS4_EM_STAGES - 1; ++s) {
        if (s < nk) em_issue_stage<TN, GATE_UP>(smem + s * L::STAGE, w0, w1, K, x, rows, s);
        ds4_em_cp_async_commit();
    }
    for (int kc = 0; kc < nk; ++kc) {
        ds4_em_cp_async_wait<DS4_EM_STAGES - 2>();  // stage kc has landed (this thread's copies)
        __syncthreads();                            // ... everyone's; and stage kc - 1 is consumed
        const int next = kc + DS4_EM_STAGES - 1;
        if (next < nk) em_issue_stage<TN, GATE_UP>(smem + (next % DS4_EM_STAGES) * L::STAGE, w0, w1, K, x, rows, next);
        ds4_em_cp_async_commit();
        em_compute_stage<TN>(acc, smem + (kc % DS4_EM_STAGES) * L::STAGE, warp, lane);
    }
    ds4_em_cp_async_wait<0>();
    __syncthreads();
}

template <int TN>
__device__ __forceinline__ void em_check_smem() {
    if (threadIdx.x == 0) {
        unsigned dyn;
        asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
        if (dyn < (unsigned)EmLayout<TN>::BYTES) __trap();  // the launcher's size disagrees with this layout
    }
}

// 8 floats of the epilogue tile -> 8 bf16 (one 16-byte store) or 8 floats (two).
template <bool OUT_F32>
__device__ __forceinline__ void em_store8(const float* src, void* dst) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    const float4 b = *reinterpret_cast<const float4*>(src + 4);
    if constexpr (OUT_F32) {
        reinterpret_cast<float4*>(dst)[0] = a;
        reinterpret_cast<float4*>(dst)[1] = b;
    } else {
        uint4 o;
        o.x = ds4_em_pack_bf16(a.x, a.y);
        o.y = ds4_em_pack_bf16(a.z, a.w);
        o.z = ds4_em_pack_bf16(b.x, b.y);
        o.w = ds4_em_pack_bf16(b.z, b.w);
        *reinterpret_cast<uint4*>(dst) = o;
    }
}

// expert_mlp_gate_up: grid = the host's bound on items (tiles = I / 32), 128 threads, dynamic
// shared memory EmLayout<TN>::BYTES (checked).  Needs D % 64 == 0, I % 64 == 0, E <= 1024, x
// [N, D], w_gate / w_up [E, I, D] and h [N, I] contiguous and 16-byte aligned.  limit <= 0: no clamp.
template <int TN>
__global__ void __launch_bounds__(DS4_EM_THREADS, 4)
expert_mlp_gate_up(const __nv_bfloat16* __restrict__ x, const int* __restrict__ offsets,
                   const __nv_bfloat16* __restrict__ w_gate, const __nv_bfloat16* __restrict__ w_up, int E, int N,
                   int D, int I, float limit, __nv_bfloat16* __restrict__ h) {
    using L = EmLayout<TN>;
    extern __shared__ __align__(128) unsigned char smem[];
    em_check_smem<TN>();
    EmItem it;
    if (!em_find_item<TN>(offsets, E, N, I / DS4_EM_GU_FEATURES, (long long)blockIdx.x, it)) return;
    const long long f0 = (long long)it.tile * DS4_EM_GU_FEATURES;
    const long long wofs = ((long long)it.e * I + f0) * D;
    float acc[TN / 8][4];
    em_mainloop<TN, true>(acc, smem, w_gate + wofs, w_up + wofs, D, x + (long long)it.row0 * D, it.rows);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* tile = reinterpret_cast<float*>(smem);  // [TN][GU_PITCH]: h of the group's rows x 32 features
    const int f = 8 * warp + g;
#pragma unroll
    for (int nt = 0; nt < TN / 8; ++nt) {
        const int n = nt * 8 + 2 * t;
        tile[n * L::GU_PITCH + f] = ds4_em_swiglu(acc[nt][0], acc[nt][2], limit);
        tile[(n + 1) * L::GU_PITCH + f] = ds4_em_swiglu(acc[nt][1], acc[nt][3], limit);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < TN * (DS4_EM_GU_FEATURES / 8); c += DS4_EM_THREADS) {
        const int n = c >> 2, q = c & 3;
        if (n < it.rows)
            em_store8<false>(tile + n * L::GU_PITCH + q * 8, h + (long long)(it.row0 + n) * I + f0 + q * 8);
    }
}

// The down projection of one block: item blockIdx.x (tiles = D / 64), the k columns
// [k0, k0 + 64 nk) of h and w_down (nk < 0: all of I), stored into out [N, D] (bf16, or float32
// with OUT_F32).
template <int TN, bool OUT_F32>
__device__ __forceinline__ void em_down_block(const __nv_bfloat16* __restrict__ h, const int* __restrict__ offsets,
                                              const __nv_bfloat16* __restrict__ w_down, int E, int N, int D, int I,
                                              int k0, int nk, void* __restrict__ out) {
    using L = EmLayout<TN>;
    extern __shared__ __align__(128) unsigned char smem[];
    em_check_smem<TN>();
    EmItem it;
    if (!em_find_item<TN>(offsets, E, N, D / DS4_EM_TILE_ROWS, (long long)blockIdx.x, it)) return;
    const long long f0 = (long long)it.tile * DS4_EM_TILE_ROWS;
    float acc[TN / 8][4];
    em_mainloop<TN, false>(acc, smem, w_down + ((long long)it.e * D + f0) * I + k0, nullptr, I,
                           h + (long long)it.row0 * I + k0, it.rows, nk);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* tile = reinterpret_cast<float*>(smem);  // [TN][DOWN_PITCH]: the group's rows x 64 features
    const int f = 16 * warp + g;
#pragma unroll
    for (int nt = 0; nt < TN / 8; ++nt) {
        const int n = nt * 8 + 2 * t;
        tile[n * L::DOWN_PITCH + f] = acc[nt][0];
        tile[(n + 1) * L::DOWN_PITCH + f] = acc[nt][1];
        tile[n * L::DOWN_PITCH + f + 8] = acc[nt][2];
        tile[(n + 1) * L::DOWN_PITCH + f + 8] = acc[nt][3];
    }
    __syncthreads();
    constexpr int ITEM = OUT_F32 ? 4 : 2;
    unsigned char* o = static_cast<unsigned char*>(out);
    for (int c = threadIdx.x; c < TN * (DS4_EM_TILE_ROWS / 8); c += DS4_EM_THREADS) {
        const int n = c >> 3, q = c & 7;
        if (n < it.rows)
            em_store8<OUT_F32>(tile + n * L::DOWN_PITCH + q * 8,
                               o + ((long long)(it.row0 + n) * D + f0 + q * 8) * ITEM);
    }
}

// expert_mlp_down: grid = the host's bound on items (tiles = D / 64), 128 threads, dynamic shared
// memory EmLayout<TN>::BYTES.  h [N, I] (written by expert_mlp_gate_up for every row of every
// expert), w_down [E, D, I], out [N, D] (bf16, or float32 with OUT_F32) contiguous, 16-byte aligned.
template <int TN, bool OUT_F32>
__global__ void __launch_bounds__(DS4_EM_THREADS, 4)
expert_mlp_down(const __nv_bfloat16* __restrict__ h, const int* __restrict__ offsets,
                const __nv_bfloat16* __restrict__ w_down, int E, int N, int D, int I, void* __restrict__ out) {
    em_down_block<TN, OUT_F32>(h, offsets, w_down, E, N, D, I, 0, -1, out);
}

// expert_mlp_down_splitk (grouped_linear's split variant): as expert_mlp_down, blockIdx.y = the
// split s of S = gridDim.y, each over the k columns [s KS, (s + 1) KS) (KS a multiple of 64),
// writing float32 partial sums into part [S, N, D]; the launcher adds the S partials.  For
// projections with few 64-row tiles (an O = 1024 output is 16 tiles: 16 blocks cannot stream a
// weight matrix at memory bandwidth).
template <int TN>
__global__ void __launch_bounds__(DS4_EM_THREADS, 4)
expert_mlp_down_splitk(const __nv_bfloat16* __restrict__ h, const int* __restrict__ offsets,
                       const __nv_bfloat16* __restrict__ w_down, int E, int N, int D, int I, int KS,
                       float* __restrict__ part) {
    em_down_block<TN, true>(h, offsets, w_down, E, N, D, I, (int)blockIdx.y * KS, KS / DS4_EM_BK,
                            part + (long long)blockIdx.y * N * D);
}

// expert_mlp_split_reduce: out[r, :] = sum over s = 0 .. S-1 (in that order) of part[s, r, :] for
// the rows r below offsets[E] (clamped to [0, N]); rows from there on are left unwritten, as the
// unsplit kernel leaves them.  One thread per 8 values (D % 8 == 0), 256 threads per block.
template <bool OUT_F32>
__global__ void __launch_bounds__(256)
expert_mlp_split_reduce(const float* __restrict__ part, int S, int N, int D, const int* __restrict__ offsets, int E,
                        void* __restrict__ out) {
    const int rows = min(max(__ldg(offsets + E), 0), N);
    const long long per_row = D / 8;
    const long long c = (long long)blockIdx.x * 256 + threadIdx.x;
    if (c >= (long long)rows * per_row) return;
    const long long r = c / per_row, q = c % per_row;
    __align__(16) float acc[8];  // em_store8 reads it as float4
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int s = 0; s < S; ++s) {
        const float* src = part + ((long long)s * N + r) * D + q * 8;
        const float4 a = *reinterpret_cast<const float4*>(src);
        const float4 b = *reinterpret_cast<const float4*>(src + 4);
        acc[0] += a.x; acc[1] += a.y; acc[2] += a.z; acc[3] += a.w;
        acc[4] += b.x; acc[5] += b.y; acc[6] += b.z; acc[7] += b.w;
    }
    constexpr int ITEM = OUT_F32 ? 4 : 2;
    em_store8<OUT_F32>(acc, static_cast<unsigned char*>(out) + (r * D + q * 8) * ITEM);
}
