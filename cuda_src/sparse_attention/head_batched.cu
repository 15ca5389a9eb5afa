// sparse_attention_head_batched<HG, BK, FP8, PARTIAL> — sparse decode attention with an attention
// sink on tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulators).  DeepSeek-V4 attention
// is multi-query: every head of a query row reads the same gathered KV rows, so one block takes a
// tile of HT = 16 * HG heads of one row and each gathered KV tile serves all of them.
//
// Thread layout: 8 warps per block, one block per (query row, tile of HT heads) or, with PARTIAL
// (the split_k variant), per (query row, head tile, run of `chunk` slots).  Per KV tile of BK slots:
//   S = Q K^T: warp w computes 16 heads (group w % HG) x BK / (8 / HG) slots (part w / HG);
//   online softmax: per-part row maxima meet in shared memory; P (bf16) goes to shared memory;
//   O += P V:  warp w owns dims 64w .. 64w + 63 of all HT heads (HG * 32 accumulators a thread).
// Shared memory: Q (HT x 512 bf16), the KV tile (two stages; FP8: two stages of raw 584-byte rows
// plus one bf16 tile they are dequantised into), P, and the per-head maxima / scales / sums.  Rows
// are padded to 1040 bytes so ldmatrix reads are free of bank conflicts.  cp.async double buffering:
// tile t + 1 is in flight while tile t is computed.
//
// Bytes moved per block: q (HT x 1 KB), each slot's row once (1024 B bf16 / 584 B fp8), and the
// output (HT x 1 KB bf16), or with PARTIAL the float32 partials (HT x (512 + 2) x 4 B).  A query
// row with H > 64 has several head tiles (adjacent blocks), which gather the same rows; the second
// read usually hits L2.
#include "sparse_attention_common.cuh"

template <int HG, int BK, bool FP8>
struct HBLayout {
    static constexpr int HT = 16 * HG;                  // heads of a block
    static constexpr int PARTS = DS4_SA_WARPS / HG;     // S warps of one head group
    static constexpr int SP = BK / PARTS;               // slots of one S warp
    static constexpr int ROW = 1040;                    // padded shared row of 512 bf16
    static constexpr int PROW = (BK + 8) * 2;           // padded shared row of P
    static constexpr int STG_ROW = 592;                 // 37 x 16 bytes cover one 584-byte FP8 row
    static constexpr int Q_OFF = 0;
    static constexpr int KV_OFF = Q_OFF + HT * ROW;
    static constexpr int KV_BYTES = (FP8 ? 1 : 2) * BK * ROW;
    static constexpr int STG_OFF = KV_OFF + KV_BYTES;
    static constexpr int STG_BYTES = FP8 ? 2 * BK * STG_ROW : 0;
    static constexpr int P_OFF = STG_OFF + STG_BYTES;
    static constexpr int RED_OFF = P_OFF + HT * PROW;
    static constexpr int LSUM_OFF = RED_OFF + PARTS * HT * 4;
    static constexpr int ALPHA_OFF = LSUM_OFF + PARTS * HT * 4;
    static constexpr int MFIN_OFF = ALPHA_OFF + HT * 4;
    static constexpr int FLAG_OFF = MFIN_OFF + HT * 4;
    static constexpr int BYTES = FLAG_OFF + 2 * BK;
    static_assert(SP % 8 == 0, "an S warp takes whole 8-slot mma tiles");
    static_assert(HG == 1 || HG == 2 || HG == 4, "head groups per block");
};

// Issue the cp.async gather of KV tile t (slots base .. base + BK - 1 of this block's range) into
// its stage.  Invalid or absent slots are zero-filled and flagged 0; bad slot numbers are counted.
// FP8 rows are 8-byte aligned: each is copied as 37 aligned 16-byte pieces starting `off` (0 or 8)
// bytes before it, and flags bit 3 records off (the last piece of an aligned row takes 8 bytes so
// nothing past the row is read).
template <int HG, int BK, bool FP8>
__device__ __forceinline__ void hb_issue_tile(unsigned char* smem, int stage, const unsigned char* kv,
                                              long long kv_stride, long long pool_rows, const int* idx, int base,
                                              int end, bool counter, int* errors) {
    using L = HBLayout<HG, BK, FP8>;
    unsigned char* flags = smem + L::FLAG_OFF + stage * BK;
    if constexpr (!FP8) {
        unsigned char* dst = smem + L::KV_OFF + stage * BK * L::ROW;
        for (int c = threadIdx.x; c < BK * 64; c += 256) {
            const int r = c >> 6, ch = c & 63, j = base + r;
            const int slot = j < end ? idx[j] : -1;
            const bool ok = ds4_slot_ok(slot, pool_rows);
            const unsigned char* src = ok ? kv + (long long)slot * kv_stride + ch * 16 : kv;
            ds4_cp_async16(dst + r * L::ROW + ch * 16, src, ok ? 16 : 0);
            if (ch == 0) {
                flags[r] = ok ? 1 : 0;
                if (counter && j < end && ds4_slot_bad(slot, pool_rows)) atomicAdd(errors, 1);
            }
        }
    } else {
        unsigned char* dst = smem + L::STG_OFF + stage * BK * L::STG_ROW;
        for (int c = threadIdx.x; c < BK * 37; c += 256) {
            const int r = c / 37, ch = c - 37 * (c / 37), j = base + r;
            const int slot = j < end ? idx[j] : -1;
            const bool ok = ds4_slot_ok(slot, pool_rows);
            const unsigned char* row = ok ? kv + (long long)slot * kv_stride : kv;
            const int off = (int)(reinterpret_cast<size_t>(row) & 8u);
            const int bytes = !ok ? 0 : (ch == 36 && off == 0 ? 8 : 16);
            ds4_cp_async16(dst + r * L::STG_ROW + ch * 16, ok ? row - off + ch * 16 : kv, bytes);
            if (ch == 0) {
                flags[r] = ok ? (unsigned char)(1 | off) : 0;
                if (counter && j < end && ds4_slot_bad(slot, pool_rows)) atomicAdd(errors, 1);
            }
        }
    }
}

// FP8 stage -> bf16 tile: each thread writes 16-byte units (8 nope values with their tile's scale,
// or 8 rope values copied).  Zero-filled rows decode to zeros.
template <int HG, int BK>
__device__ __forceinline__ void hb_dequant(unsigned char* smem, int stage) {
    using L = HBLayout<HG, BK, true>;
    const unsigned char* stg = smem + L::STG_OFF + stage * BK * L::STG_ROW;
    const unsigned char* flags = smem + L::FLAG_OFF + stage * BK;
    unsigned char* dst = smem + L::KV_OFF;
    for (int u = threadIdx.x; u < BK * 64; u += 256) {
        const int r = u >> 6, c = u & 63;
        const unsigned char* srow = stg + r * L::STG_ROW + (flags[r] & 8);
        uint4 v;
        if (c < DS4_SA_NOPE / 8) {
            const uint2 w = *reinterpret_cast<const uint2*>(srow + 8 * c);
            v = ds4_dequant8(w, ds4_ue8m0(srow[DS4_SA_FP8_SCALE_OFF + (c >> 3)]));
        } else {
            const uint2* p = reinterpret_cast<const uint2*>(srow + DS4_SA_FP8_ROPE_OFF + 16 * (c - DS4_SA_NOPE / 8));
            const uint2 a = p[0], b = p[1];
            v = make_uint4(a.x, a.y, b.x, b.y);
        }
        *reinterpret_cast<uint4*>(dst + r * L::ROW + 16 * c) = v;
    }
}

// sparse_attention_head_batched: grid head_blocks * N (* splits with PARTIAL) blocks of 256 threads,
// block index = (n * splits + split) * head_blocks + head block, so a row's head tiles run side by
// side.  Dynamic shared memory: HBLayout::BYTES (checked).  PARTIAL writes, per (n, h, split), the
// unnormalised o (float32 [512]) and (m, l) in base-2 units to part_o / part_ml; otherwise the
// block writes o (bf16, after the sink and the optional inverse RoPE) and lse.
template <int HG, int BK, bool FP8, bool PARTIAL>
__global__ void __launch_bounds__(256, HG == 4 ? 1 : 2)
sparse_attention_head_batched(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv,
                              long long kv_stride, long long pool_rows, const int* __restrict__ indices, int K,
                              const float* __restrict__ sink, int H, int head_blocks, float scale_log2,
                              const void* __restrict__ positions, int pos64, const float* __restrict__ rope_cos,
                              const float* __restrict__ rope_sin, long long max_pos,
                              __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                              float* __restrict__ part_o, float* __restrict__ part_ml, int chunk, int splits,
                              int* __restrict__ errors) {
    using L = HBLayout<HG, BK, FP8>;
    constexpr int HT = L::HT, NT = L::SP / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    if (threadIdx.x == 0) {
        unsigned dyn;
        asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
        if (dyn < (unsigned)L::BYTES) __trap();  // the launcher's size disagrees with this layout
    }
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    long long b = blockIdx.x;
    const int hb = (int)(b % head_blocks);
    b /= head_blocks;
    int split = 0;
    if constexpr (PARTIAL) {
        split = (int)(b % splits);
        b /= splits;
    }
    const long long n = b;
    const int h0 = hb * HT;
    const int j_begin = PARTIAL ? split * chunk : 0;
    const int j_end = PARTIAL ? min(K, j_begin + chunk) : K;
    const int tiles = j_end > j_begin ? (j_end - j_begin + BK - 1) / BK : 0;
    const bool counter = errors != nullptr && hb == 0;
    const int* idx = indices + n * K;

    for (int c = tid; c < HT * 64; c += 256) {  // Q tile; heads beyond H are zeros
        const int r = c >> 6, ch = c & 63, h = h0 + r;
        const bool ok = h < H;
        ds4_cp_async16(smem + L::Q_OFF + r * L::ROW + ch * 16, ok ? q + ((n * H + h) * DS4_SA_DIM + ch * 8) : q,
                       ok ? 16 : 0);
    }
    if (tiles > 0) hb_issue_tile<HG, BK, FP8>(smem, 0, kv, kv_stride, pool_rows, idx, j_begin, j_end, counter, errors);
    ds4_cp_async_commit();

    const int g = warp % HG, part = warp / HG;  // S phase: head group and slot part
    const int r0 = lane >> 2, cq = 2 * (lane & 3);
    float m_run[2] = {DS4_NEG_INF, DS4_NEG_INF}, l_run[2] = {0.0f, 0.0f};
    float acc[HG][8][4];
#pragma unroll
    for (int mt = 0; mt < HG; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    float* red = reinterpret_cast<float*>(smem + L::RED_OFF);
    float* alpha_s = reinterpret_cast<float*>(smem + L::ALPHA_OFF);

    for (int t = 0; t < tiles; ++t) {
        const int st = t & 1;
        ds4_cp_async_wait_all();
        __syncthreads();  // tile t landed; every warp is done with tile t - 1
        if (t + 1 < tiles)
            hb_issue_tile<HG, BK, FP8>(smem, st ^ 1, kv, kv_stride, pool_rows, idx, j_begin + (t + 1) * BK, j_end,
                                       counter, errors);
        ds4_cp_async_commit();
        const unsigned char* kvt = smem + L::KV_OFF + (FP8 ? 0 : st * BK * L::ROW);
        if constexpr (FP8) {
            hb_dequant<HG, BK>(smem, st);
            __syncthreads();
        }
        const unsigned char* flags = smem + L::FLAG_OFF + st * BK;

        // S = Q K^T for 16 heads x SP slots, two k-steps per round
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
        {
            const unsigned qa = ds4_smem_addr(smem + L::Q_OFF + (g * 16 + (lane & 15)) * L::ROW + (lane >> 4) * 16);
            const unsigned kb = ds4_smem_addr(kvt + (part * L::SP + (lane & 7)) * L::ROW + (lane >> 3) * 16);
#pragma unroll 4
            for (int k0 = 0; k0 < DS4_SA_DIM * 2; k0 += 64) {
                unsigned a0[4], a1[4];
                ds4_ldmatrix_x4(a0, qa + k0);
                ds4_ldmatrix_x4(a1, qa + k0 + 32);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    unsigned bb[4];
                    ds4_ldmatrix_x4(bb, kb + nt * 8 * L::ROW + k0);
                    ds4_mma_bf16(s[nt], a0, bb[0], bb[1]);
                    ds4_mma_bf16(s[nt], a1, bb[2], bb[3]);
                }
            }
        }
        // mask, scale, row maxima of this part
        float mx0 = DS4_NEG_INF, mx1 = DS4_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool ok = flags[part * L::SP + nt * 8 + cq + e] & 1;
                s[nt][e] = ok ? s[nt][e] * scale_log2 : DS4_NEG_INF;
                s[nt][2 + e] = ok ? s[nt][2 + e] * scale_log2 : DS4_NEG_INF;
                mx0 = fmaxf(mx0, s[nt][e]);
                mx1 = fmaxf(mx1, s[nt][2 + e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        if ((lane & 3) == 0) {
            red[part * HT + g * 16 + r0] = mx0;
            red[part * HT + g * 16 + r0 + 8] = mx1;
        }
        __syncthreads();
        float alpha[2], mu[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float tm = DS4_NEG_INF;
#pragma unroll
            for (int p = 0; p < L::PARTS; ++p) tm = fmaxf(tm, red[p * HT + g * 16 + r0 + 8 * i]);
            const float mn = fmaxf(m_run[i], tm);
            alpha[i] = mn == DS4_NEG_INF ? 1.0f : ds4_exp2(m_run[i] - mn);
            mu[i] = mn == DS4_NEG_INF ? 0.0f : mn;
            m_run[i] = mn;
            l_run[i] *= alpha[i];
        }
        // P = exp2(s - m) in bf16; l sums the rounded values the product uses
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const unsigned w = ds4_pack_bf16x2(ds4_exp2(s[nt][2 * i] - mu[i]), ds4_exp2(s[nt][2 * i + 1] - mu[i]));
                const float2 pr = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
                l_run[i] += pr.x + pr.y;
                *reinterpret_cast<unsigned*>(smem + L::P_OFF + (g * 16 + r0 + 8 * i) * L::PROW +
                                             (part * L::SP + nt * 8 + cq) * 2) = w;
            }
        if (part == 0 && (lane & 3) == 0) {
            alpha_s[g * 16 + r0] = alpha[0];
            alpha_s[g * 16 + r0 + 8] = alpha[1];
        }
        __syncthreads();

        // O[:, 64w .. 64w + 63] = alpha * O + P V
#pragma unroll
        for (int mt = 0; mt < HG; ++mt) {
            const float lo = alpha_s[mt * 16 + r0], hi = alpha_s[mt * 16 + r0 + 8];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                acc[mt][nt][0] *= lo;
                acc[mt][nt][1] *= lo;
                acc[mt][nt][2] *= hi;
                acc[mt][nt][3] *= hi;
            }
        }
        {
            const unsigned pa = ds4_smem_addr(smem + L::P_OFF + (lane & 15) * L::PROW + (lane >> 4) * 16);
            const unsigned vb =
                ds4_smem_addr(kvt + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::ROW + (warp * 64 + (lane >> 4) * 8) * 2);
#pragma unroll 1  // unrolled, ptxas hoists the next k-step's fragments and spills at the register cap
            for (int ks = 0; ks < BK / 16; ++ks) {
                unsigned pf[HG][4];
#pragma unroll
                for (int mt = 0; mt < HG; ++mt) ds4_ldmatrix_x4(pf[mt], pa + mt * 16 * L::PROW + ks * 32);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned vv[4];
                    ds4_ldmatrix_x4_trans(vv, vb + ks * 16 * L::ROW + np * 32);
#pragma unroll
                    for (int mt = 0; mt < HG; ++mt) {
                        ds4_mma_bf16(acc[mt][2 * np], pf[mt], vv[0], vv[1]);
                        ds4_mma_bf16(acc[mt][2 * np + 1], pf[mt], vv[2], vv[3]);
                    }
                }
            }
        }
    }
    ds4_cp_async_wait_all();

    // Epilogue: sums of the S warps' parts, then each PV warp finishes its dims of every head.
    float* lsum = reinterpret_cast<float*>(smem + L::LSUM_OFF);
    float* mfin = reinterpret_cast<float*>(smem + L::MFIN_OFF);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if ((lane & 3) == 0) {
            lsum[part * HT + g * 16 + r0 + 8 * i] = l;
            if (part == 0) mfin[g * 16 + r0 + 8 * i] = m_run[i];
        }
    }
    __syncthreads();
    const bool rope = !PARTIAL && positions != nullptr;
    const long long pos = rope ? ds4_sa_position(positions, pos64, n) : 0;
#pragma unroll
    for (int mt = 0; mt < HG; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = mt * 16 + r0 + 8 * i, h = h0 + row;
            if (h >= H) continue;
            float l = 0.0f;
#pragma unroll
            for (int p = 0; p < L::PARTS; ++p) l += lsum[p * HT + row];
            const float m = mfin[row];
            const long long nh = n * H + h;
            if constexpr (PARTIAL) {
                float* dst = part_o + (nh * splits + split) * DS4_SA_DIM + warp * 64 + cq;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
                    *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(acc[mt][nt][2 * i], acc[mt][nt][2 * i + 1]);
                if (warp == 0 && (lane & 3) == 0)
                    *reinterpret_cast<float2*>(part_ml + (nh * splits + split) * 2) = make_float2(m, l);
            } else {
                const float inv = ds4_sa_inv_denominator(l, m, sink[h]);
                unsigned* dst = reinterpret_cast<unsigned*>(out + nh * DS4_SA_DIM + warp * 64 + cq);
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    float x0 = acc[mt][nt][2 * i] * inv, x1 = acc[mt][nt][2 * i + 1] * inv;
                    if (rope && warp * 64 >= DS4_SA_NOPE)
                        ds4_inverse_rope(x0, x1, rope_cos, rope_sin, pos, max_pos,
                                         (warp * 64 + nt * 8 + cq - DS4_SA_NOPE) / 2);
                    dst[nt * 4] = ds4_pack_bf16x2(x0, x1);
                }
                if (lse != nullptr && warp == 0 && (lane & 3) == 0) lse[nh] = ds4_sa_lse(l, m);
            }
        }
    if (rope && counter && tid == 0 && (pos < 0 || pos >= max_pos)) atomicAdd(errors, 1);
}
