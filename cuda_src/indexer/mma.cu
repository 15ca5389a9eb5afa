// indexer_logits_mma<TG, FP8> — the lightning indexer's logits on tensor cores (mma.sync
// m16n8k16, bf16 in, float32 accumulators):
//   logits[t, c] = sum_h w[t, h] * relu(scale_c * (q[t, h] . key[c]))   for c < lengths[t]
//
// Thread layout: 4 warps per block; warp w holds the A fragments of heads 16w .. 16w + 15 x 128
// dims of q (32 registers a token, loaded once).  A block takes TG tokens and a run of key tiles of
// 64 columns (one tile = one key page); per tile, S = q . key^T is 16 heads x 64 keys per warp
// and token, computed in parts of 32 keys (TG = 1) or 16 keys (TG = 2: registers); then (fp8:
// times the key's scale) relu, times w[t, h], summed over the warp's 16 heads by a shuffle
// reduce-scatter (a part's 8 or 4 values per lane over the 8 lanes of a column pair, 7 or 4
// shuffles) and over the 4 warps in shared memory: 64 logits of each token per tile.
//
// TG = 2 only where the tokens share their keys (prefill of one sequence): every key fragment
// loaded from shared memory then feeds two tokens' mma (half the ldmatrix traffic per FLOP) and
// each key tile is fetched from L2 once for both; more tokens would not fit the registers (the A
// fragments of TG tokens take 32 TG registers a thread).  TG = 1 for one query per sequence.
//
// Key tiles come into shared memory with cp.async, double buffered (tile j + 1 in flight while
// tile j is computed); rows are padded to 272 bytes so ldmatrix is free of bank conflicts.  FP8
// tiles land raw (128 bytes a row, two stages, with their 64 scales) and are converted to bf16
// (exact) into one padded tile before ldmatrix; the scale multiplies the float32 dot product.
//
// Bytes moved per block: q (TG x 16 KB, from L2 after the first block), each key row of its run
// below the longest of its tokens' lengths once (256 B bf16, 132 B fp8 with the scale), 4 B of
// logits per (token, column).  Tiles wholly beyond lengths are neither read nor computed.
#include "indexer_common.cuh"

template <int TG, bool FP8>
struct IxLayout {
    static constexpr int ROW = 272;                          // padded shared row of 128 bf16
    static constexpr int TILE_BYTES = DS4_IX_TILE * ROW;     // one bf16 key tile
    static constexpr int RAW_TILE = DS4_IX_TILE * DS4_IX_DIM;  // one raw fp8 tile (unpadded)
    static constexpr int Q_OFF = 0;
    static constexpr int KT_OFF = Q_OFF + TG * DS4_IX_HEADS * ROW;
    static constexpr int KT_BYTES = (FP8 ? 1 : 2) * TILE_BYTES;
    static constexpr int RAW_OFF = KT_OFF + KT_BYTES;
    static constexpr int RAW_BYTES = FP8 ? 2 * RAW_TILE : 0;
    static constexpr int SC_OFF = RAW_OFF + RAW_BYTES;
    static constexpr int SC_BYTES = FP8 ? 2 * DS4_IX_TILE * 4 : 0;
    static constexpr int RED_OFF = SC_OFF + SC_BYTES;
    static constexpr int RED_BYTES = TG * DS4_IX_MMA_WARPS * DS4_IX_TILE * 4;
    static constexpr int W_OFF = RED_OFF + RED_BYTES;
    static constexpr int BYTES = W_OFF + TG * DS4_IX_HEADS * 4;
    static_assert(TG == 1 || TG == 2, "tokens per block");
};

// Issue the cp.async copy of one key tile (rows row0 .. row0 + rows - 1; the rest of the tile is
// zero-filled, rows = 0 copies nothing) into `stage`.
template <int TG, bool FP8>
__device__ __forceinline__ void ix_issue_tile(unsigned char* smem, int stage, const unsigned char* keys,
                                              const float* key_scales, long long row0, int rows) {
    using L = IxLayout<TG, FP8>;
    if constexpr (!FP8) {
        unsigned char* dst = smem + L::KT_OFF + stage * L::TILE_BYTES;
        for (int c = threadIdx.x; c < DS4_IX_TILE * 16; c += DS4_IX_MMA_THREADS) {
            const int r = c >> 4, ch = c & 15;
            const bool ok = r < rows;
            ds4_ix_cp_async16(dst + r * L::ROW + ch * 16, ok ? keys + (row0 + r) * 256 + ch * 16 : keys, ok ? 16 : 0);
        }
    } else {
        unsigned char* dst = smem + L::RAW_OFF + stage * L::RAW_TILE;
        for (int c = threadIdx.x; c < DS4_IX_TILE * 8; c += DS4_IX_MMA_THREADS) {
            const int r = c >> 3;
            const bool ok = r < rows;
            ds4_ix_cp_async16(dst + c * 16, ok ? keys + (row0 + r) * 128 + (c & 7) * 16 : keys, ok ? 16 : 0);
        }
        if (threadIdx.x < DS4_IX_TILE) {
            const int r = threadIdx.x;
            const bool ok = r < rows;
            float* sc = reinterpret_cast<float*>(smem + L::SC_OFF) + stage * DS4_IX_TILE + r;
            ds4_ix_cp_async4(sc, ok ? key_scales + row0 + r : key_scales, ok ? 4 : 0);
        }
    }
}

// Raw fp8 stage -> the bf16 tile: each thread converts 16-byte pieces (16 values of one row).
template <int TG>
__device__ __forceinline__ void ix_convert_tile(unsigned char* smem, int stage) {
    using L = IxLayout<TG, true>;
    const uint4* raw = reinterpret_cast<const uint4*>(smem + L::RAW_OFF + stage * L::RAW_TILE);
    unsigned char* dst = smem + L::KT_OFF;
    for (int u = threadIdx.x; u < DS4_IX_TILE * 8; u += DS4_IX_MMA_THREADS) {
        const uint4 v = raw[u];
        uint4 a, b;
        ds4_ix_e4m3x4_to_bf16(v.x, a.x, a.y);
        ds4_ix_e4m3x4_to_bf16(v.y, a.z, a.w);
        ds4_ix_e4m3x4_to_bf16(v.z, b.x, b.y);
        ds4_ix_e4m3x4_to_bf16(v.w, b.z, b.w);
        uint4* d = reinterpret_cast<uint4*>(dst + (u >> 3) * L::ROW + (u & 7) * 32);
        d[0] = a;
        d[1] = b;
    }
}

// Sum of v over the 8 lanes of a warp that share lane & 3 (the 8 head rows of an mma fragment),
// scattered: NV = 8 values -> one per lane, value index 4 b4 + 2 b3 + b2 (lane bits); NV = 4 ->
// value 2 b4 + b3, the lanes differing in bit 2 holding the same sum.  Result in v[0].
template <int NV>
__device__ __forceinline__ void ix_reduce_scatter(float (&v)[NV], int lane) {
#pragma unroll
    for (int m = 0; (NV >> (m + 1)) >= 1; ++m) {
        const int n = NV >> (m + 1);  // values kept
        const bool up = (lane >> (4 - m)) & 1;
#pragma unroll
        for (int x = 0; x < n; ++x) {
            const float send = up ? v[x] : v[x + n];
            const float keep = up ? v[x + n] : v[x];
            v[x] = keep + __shfl_xor_sync(0xffffffffu, send, 16 >> m);
        }
    }
    if constexpr (NV == 4) v[0] += __shfl_xor_sync(0xffffffffu, v[0], 4);
}

// indexer_logits_mma: grid runs * groups blocks of 128 threads, block index = r * groups + g (the
// token groups of one run of key tiles are adjacent, so with shared keys each tile is read from
// HBM about once); group g: tokens TG g .. TG g + TG - 1; run r: key tiles r * run .. r * run +
// run - 1.  Dynamic shared memory: IxLayout::BYTES (checked).  per_token (decode, TG = 1): token
// t reads sequence t, else sequence 0.  fill_tail: write -inf to the columns in [lengths[t], C)
// of the block's tiles (the user-visible logits); otherwise those are left untouched.
template <int TG, bool FP8>
__global__ void __launch_bounds__(DS4_IX_MMA_THREADS, TG == 1 ? 4 : 3)
indexer_logits_mma(const __nv_bfloat16* __restrict__ q, const float* __restrict__ w,
                   const unsigned char* __restrict__ keys, const float* __restrict__ key_scales,
                   const int* __restrict__ block_table, int max_pages, long long pages, int C, int T, int per_token,
                   const int* __restrict__ lengths, int groups, int run, float* __restrict__ logits, int fill_tail,
                   int* __restrict__ errors) {
    using L = IxLayout<TG, FP8>;
    constexpr int PARTS = TG == 1 ? 2 : 4;  // key parts of a tile computed one after another (registers)
    constexpr int PK = DS4_IX_TILE / PARTS, NT = PK / 8, NV = 2 * NT;
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) {
        unsigned dyn;
        asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
        if (dyn < (unsigned)L::BYTES) __trap();  // the launcher's size disagrees with this layout
    }
    const int g = (int)(blockIdx.x % groups), r = (int)(blockIdx.x / groups);
    const int t0 = g * TG;
    const int n_tiles = (C + DS4_IX_TILE - 1) / DS4_IX_TILE;
    const int j0 = r * run, j1 = min(j0 + run, n_tiles);

    int len[TG];
    int maxlen = 0;
#pragma unroll
    for (int i = 0; i < TG; ++i) {
        bool bad = false;
        len[i] = t0 + i < T ? ds4_ix_length(lengths, t0 + i, C, bad) : 0;
        maxlen = max(maxlen, len[i]);
        if (errors != nullptr && bad && r == 0 && tid == 0) atomicAdd(errors, 1);
    }
    if (fill_tail) {
#pragma unroll
        for (int i = 0; i < TG; ++i) {
            if (t0 + i >= T) continue;
            const int end = min(C, j1 * DS4_IX_TILE);
            for (int c = max(len[i], j0 * DS4_IX_TILE) + tid; c < end; c += DS4_IX_MMA_THREADS)
                logits[(long long)(t0 + i) * C + c] = DS4_NEG_INF;
        }
    }
    const int jend = min(j1, (maxlen + DS4_IX_TILE - 1) / DS4_IX_TILE);
    if (j0 >= jend) return;
    const int b = per_token ? t0 : 0;

    // q of the block's tokens (zeros for a token beyond T) and their head weights
    for (int c = tid; c < TG * DS4_IX_HEADS * 16; c += DS4_IX_MMA_THREADS) {
        const int row = c >> 4, ch = c & 15, t = t0 + row / DS4_IX_HEADS;
        const bool ok = t < T;
        ds4_ix_cp_async16(smem + L::Q_OFF + row * L::ROW + ch * 16,
                          ok ? q + ((long long)t * DS4_IX_HEADS + row % DS4_IX_HEADS) * DS4_IX_DIM + ch * 8 : q,
                          ok ? 16 : 0);
    }
    float* w_s = reinterpret_cast<float*>(smem + L::W_OFF);
    if (tid < TG * DS4_IX_HEADS) w_s[tid] = t0 + tid / DS4_IX_HEADS < T ? w[(long long)t0 * DS4_IX_HEADS + tid] : 0.0f;
    {
        const long long row0 = ds4_ix_block_row(b, j0, C, block_table, max_pages, pages);
        const int rows = row0 < 0 ? 0 : min(DS4_IX_TILE, maxlen - j0 * DS4_IX_TILE);
        ix_issue_tile<TG, FP8>(smem, 0, keys, key_scales, row0, rows);
    }
    ds4_ix_cp_async_commit();
    ds4_ix_cp_async_wait_all();
    __syncthreads();

    unsigned a[TG][8][4];  // A fragments: [token][k-step of 16 dims]
#pragma unroll
    for (int i = 0; i < TG; ++i) {
        const unsigned qa =
            ds4_ix_smem_addr(smem + L::Q_OFF + (i * DS4_IX_HEADS + warp * 16 + (lane & 15)) * L::ROW + (lane >> 4) * 16);
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) ds4_ix_ldmatrix_x4(a[i][ks], qa + ks * 32);
    }
    const int r0 = lane >> 2, cq = 2 * (lane & 3);
    // after the reduce-scatter a lane holds key (idx / 2) * 8 + cq + idx % 2 of each part
    const int idx = NV == 8 ? ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1)
                            : ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1);
    const int my_key = (idx >> 1) * 8 + cq + (idx & 1);
    const bool writer = NV == 8 || ((lane >> 2) & 1) == 0;
    float* red = reinterpret_cast<float*>(smem + L::RED_OFF);
    const float* sc_s = reinterpret_cast<const float*>(smem + L::SC_OFF);

    for (int j = j0; j < jend; ++j) {
        const int st = (j - j0) & 1;
        ds4_ix_cp_async_wait_all();
        __syncthreads();  // tile j landed; every warp is done with tile j - 1 and the reduction buffer
        if (j + 1 < jend) {
            const long long row0 = ds4_ix_block_row(b, j + 1, C, block_table, max_pages, pages);
            const int rows = row0 < 0 ? 0 : min(DS4_IX_TILE, maxlen - (j + 1) * DS4_IX_TILE);
            ix_issue_tile<TG, FP8>(smem, st ^ 1, keys, key_scales, row0, rows);
        }
        ds4_ix_cp_async_commit();
        const int c0 = j * DS4_IX_TILE;
        if (ds4_ix_block_row(b, j, C, block_table, max_pages, pages) < 0) {  // bad page (uniform)
#pragma unroll
            for (int i = 0; i < TG; ++i) {
                if (errors != nullptr && tid == 0 && c0 < len[i]) atomicAdd(errors, 1);
                if (tid < DS4_IX_TILE && c0 + tid < len[i])
                    logits[(long long)(t0 + i) * C + c0 + tid] = DS4_NEG_INF;
            }
            continue;
        }
        if constexpr (FP8) {
            ix_convert_tile<TG>(smem, st);
            __syncthreads();
        }
        const unsigned char* kt = smem + L::KT_OFF + (FP8 ? 0 : st * L::TILE_BYTES);
        const unsigned kb = ds4_ix_smem_addr(kt + (lane & 7) * L::ROW + (lane >> 3) * 16);

#pragma unroll 1
        for (int part = 0; part < PARTS; ++part) {
            float s[TG][NT][4];
#pragma unroll
            for (int i = 0; i < TG; ++i)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[i][nt][e] = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {  // two k-steps (32 dims) per ldmatrix
                    unsigned bb[4];
                    ds4_ix_ldmatrix_x4(bb, kb + (part * PK + nt * 8) * L::ROW + kk * 64);
#pragma unroll
                    for (int i = 0; i < TG; ++i) {
                        ds4_ix_mma_bf16(s[i][nt], a[i][2 * kk], bb[0], bb[1]);
                        ds4_ix_mma_bf16(s[i][nt], a[i][2 * kk + 1], bb[2], bb[3]);
                    }
                }
#pragma unroll
            for (int i = 0; i < TG; ++i) {
                const float w_lo = w_s[i * DS4_IX_HEADS + warp * 16 + r0];
                const float w_hi = w_s[i * DS4_IX_HEADS + warp * 16 + r0 + 8];
                float v[NV];  // v[2 nt + e]: key part * PK + 8 nt + cq + e, summed over heads r0 and r0 + 8
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float lo = s[i][nt][e], hi = s[i][nt][2 + e];
                        if constexpr (FP8) {
                            const float sc = sc_s[st * DS4_IX_TILE + part * PK + nt * 8 + cq + e];
                            lo *= sc;
                            hi *= sc;
                        }
                        v[2 * nt + e] = __fmaf_rn(w_lo, ds4_ix_relu(lo), w_hi * ds4_ix_relu(hi));
                    }
                ix_reduce_scatter<NV>(v, lane);
                if (writer) red[(i * DS4_IX_MMA_WARPS + warp) * DS4_IX_TILE + part * PK + my_key] = v[0];
            }
        }
        __syncthreads();
        if (tid < TG * DS4_IX_TILE) {
            const int i = tid / DS4_IX_TILE, key = tid % DS4_IX_TILE;
            const float* p = red + i * DS4_IX_MMA_WARPS * DS4_IX_TILE + key;
            const float sum = (p[0] + p[DS4_IX_TILE]) + (p[2 * DS4_IX_TILE] + p[3 * DS4_IX_TILE]);
            int li = len[0];
#pragma unroll
            for (int x = 1; x < TG; ++x)
                if (i == x) li = len[x];
            if (c0 + key < li) logits[(long long)(t0 + i) * C + c0 + key] = sum;
        }
    }
    ds4_ix_cp_async_wait_all();
}
