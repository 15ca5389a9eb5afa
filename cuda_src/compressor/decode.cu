// compress_decode<TIn, TOut, R, D, G, SPLIT> — one decode step of the DeepSeek-V4 KV compressor
// (pool, RMSNorm and RoPE: compressor_common.cuh) for `batch` rows at arbitrary positions.
//
// Thread layout: ceil(batch / G) blocks of D / 4 * SPLIT threads; a block handles G batch rows,
// each with its own accumulators, unrolled at compile time (G = 1: the naive variant; G = 2, 4,
// 8: grouped).
//
// Bytes per decode step and emitting batch row (float32 state): R = 128: the 127 older window
// rows of kv and score state (2 * 127 * D * 4), the token (2 * D * sizeof(TIn)), its state row
// (2 * D * 4) and the cache row written.  R = 4: rows 0-3 front and rows 4-6 both halves read,
// rows 0-3 and 7 written, for both arrays (2 * 20 * D * 4).  A row that does not emit only writes
// its token to the state (2 * COFF * D * 4).
#include "../common/common.cuh"
#include "compressor_common.cuh"

// Window rows of one batch row, as the decode step sees them: its state, into which the token
// was written by this same thread just before (rows of a thread are read back in program order).
template <int R, int D>
struct DecodeRows {
    float* kvs;  // kv_state of this batch row
    float* scs;  // score_state of this batch row
    int ch;      // first of this thread's 4 channels

    __device__ __forceinline__ void load(int j, float4& k, float4& s) const {
        constexpr int W = (R == 4 ? 2 : 1) * D;
        const int off = j * W + ((R == 4 && j >= 4) ? D : 0) + ch;
        k = ds4_load4(kvs + off);
        s = ds4_load4(scs + off);
    }
};

// compress_decode: one decode step for `batch` rows at arbitrary positions (one launch).  Grid:
// ceil(batch / G) blocks of D / 4 * SPLIT threads.  A row whose position is negative, whose cache
// row p / R is beyond cache_rows, or whose RoPE position is beyond max_pos is left untouched
// (state and cache) and counted in *errors.
template <typename TIn, typename TOut, int R, int D, int G, int SPLIT>
__global__ void __launch_bounds__(D / 4 * SPLIT)
compress_decode(const TIn* __restrict__ kv, const TIn* __restrict__ score, const float* __restrict__ ape,
                const float* __restrict__ norm_w, const void* __restrict__ positions, int pos64,
                const float* __restrict__ rope_cos, const float* __restrict__ rope_sin, long long max_pos,
                float* __restrict__ kv_state, float* __restrict__ score_state, TOut* __restrict__ cache,
                long long cache_rows, long long batch, float eps, int* __restrict__ errors) {
    static_assert(R == 4 || R == 128, "ratio 4 or 128");
    static_assert(D % 128 == 0, "D is a multiple of 128");
    static_assert(R == 128 || SPLIT == 1, "ratio 4 pools 8 rows in one row group");
    constexpr int COFF = R == 4 ? 2 : 1;
    constexpr int W = COFF * D;
    constexpr int SR = COFF * R;
    constexpr int CH = D / 4;
    constexpr int PS = PoolShape<R, SPLIT>::PER_SPLIT;
    __shared__ MergeSmem<D, SPLIT> sm;
    __shared__ float red[G][D / 128 > 0 ? D / 128 : 1];

    const int c4 = threadIdx.x % CH, split = threadIdx.x / CH, ch = 4 * c4;
    if constexpr (R == 4 && G == 1) {
        // One row per block: every load is issued in one round once p is known (the 8 window rows
        // of this thread's channels, the token, the RMSNorm weights and RoPE factors); the pool, the
        // shift and the token's row are then done from registers.  Same arithmetic, same order as
        // pool_rows (rows 0-7), so the same bits as the other settings and as prefill.
        const long long b0 = blockIdx.x;
        if (b0 >= batch) return;
        const long long p0 = ds4_load_pos(positions, pos64, b0);
        const bool em = (p0 + 1) % R == 0;
        if (!(p0 >= 0 && p0 / R < cache_rows && (!em || p0 + 1 - R < max_pos))) {
            if (threadIdx.x == 0 && errors != nullptr) atomicAdd(errors, 1);
            return;  // block-uniform
        }
        const int r = (int)(p0 % R);
        float* kvs = kv_state + b0 * (long long)SR * W;
        float* scs = score_state + b0 * (long long)SR * W;
        float4 tk[2], ts[2];  // the token: front and back half
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tk[h] = ds4_load4(kv + b0 * W + h * D + ch);
            ts[h] = ds4_add4(ds4_load4(score + b0 * W + h * D + ch), ds4_load4(ape + r * W + h * D + ch));
        }
        if (!em) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                ds4_store4(kvs + (4 + r) * W + h * D + ch, tk[h]);
                ds4_store4(scs + (4 + r) * W + h * D + ch, ts[h]);
            }
            return;  // block-uniform: nothing below synchronises for a row that does not emit
        }
        float4 fk[4], fs[4], hk[3][2], hs[3][2];  // rows 0-3 front; rows 4-6 both halves
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            fk[j] = ds4_load4(kvs + j * W + ch);
            fs[j] = ds4_load4(scs + j * W + ch);
        }
#pragma unroll
        for (int j = 0; j < 3; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                hk[j][h] = ds4_load4(kvs + (4 + j) * W + h * D + ch);
                hs[j][h] = ds4_load4(scs + (4 + j) * W + h * D + ch);
            }
        const RowTail tail = load_tail<D>(norm_w, ch, rope_cos, rope_sin, p0 + 1 - R);
        PoolAcc acc;
        pool_init(acc);
#pragma unroll
        for (int j = 0; j < 4; ++j) pool_add(acc, fs[j], fk[j]);
#pragma unroll
        for (int j = 0; j < 3; ++j) pool_add(acc, hs[j][1], hk[j][1]);
        pool_add(acc, ts[1], tk[1]);
        // rows 0-3 := rows 4-7 and row 7 := token
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int j = 0; j < 3; ++j) {
                ds4_store4(kvs + j * W + h * D + ch, hk[j][h]);
                ds4_store4(scs + j * W + h * D + ch, hs[j][h]);
            }
            ds4_store4(kvs + 3 * W + h * D + ch, tk[h]);
            ds4_store4(scs + 3 * W + h * D + ch, ts[h]);
            ds4_store4(kvs + 7 * W + h * D + ch, tk[h]);
            ds4_store4(scs + 7 * W + h * D + ch, ts[h]);
        }
        const float4 c = pool_result(acc);
        float sq[1] = {sumsq4(c)};
        channel_sums<D, 1>(sq, 0, red);
        finish_row<TOut, D>(c, rms_scale(sq[0], D, eps), tail, ch, cache + (b0 * cache_rows + p0 / R) * D);
        return;
    }
    long long b[G], p[G];
    bool live[G], emit[G];
    DecodeRows<R, D> rows[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        b[g] = (long long)blockIdx.x * G + g;
        live[g] = b[g] < batch;
        p[g] = live[g] ? ds4_load_pos(positions, pos64, b[g]) : 0;
        const bool em = (p[g] + 1) % R == 0;
        const bool ok = p[g] >= 0 && p[g] / R < cache_rows && (!em || p[g] + 1 - R < max_pos);
        if (live[g] && !ok) {
            if (threadIdx.x == 0 && errors != nullptr) atomicAdd(errors, 1);
            live[g] = false;
        }
        emit[g] = live[g] && em;
        if (!live[g]) continue;
        const int r = (int)(p[g] % R);
        const int nr = R == 4 ? 4 + r : r;  // the token's state row
        rows[g].kvs = kv_state + b[g] * (long long)SR * W;
        rows[g].scs = score_state + b[g] * (long long)SR * W;
        rows[g].ch = ch;
        // the token into its state row, by the threads that pool that row (R = 4: both halves)
        if (split == nr / PS) {
            const TIn* kin = kv + b[g] * W;
            const TIn* sin_ = score + b[g] * W;
            const float* a = ape + r * W;
#pragma unroll
            for (int h = 0; h < COFF; ++h) {
                const int x = h * D + ch;
                ds4_store4(rows[g].kvs + nr * W + x, ds4_load4(kin + x));
                ds4_store4(rows[g].scs + nr * W + x, ds4_add4(ds4_load4(sin_ + x), ds4_load4(a + x)));
            }
        }
    }

    RowTail tail0;  // G = 1: the row's tail loads overlap the pool
    if (G == 1 && emit[0] && split == 0) tail0 = load_tail<D>(norm_w, ch, rope_cos, rope_sin, p[0] + 1 - R);
    PoolAcc acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) pool_init(acc[g]);
    pool_rows<R, SPLIT, G>(rows, emit, acc, split);

    if (R == 4) {
        // shift rows 0-3 := rows 4-7, both halves, this thread's channels only (after its pooling
        // loads of rows 0-3, in program order)
#pragma unroll
        for (int g = 0; g < G; ++g)
            if (emit[g]) {
#pragma unroll
                for (int h = 0; h < COFF; ++h) {
                    float4 t[8];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        t[2 * j] = ds4_load4(rows[g].kvs + (4 + j) * W + h * D + ch);
                        t[2 * j + 1] = ds4_load4(rows[g].scs + (4 + j) * W + h * D + ch);
                    }
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        ds4_store4(rows[g].kvs + j * W + h * D + ch, t[2 * j]);
                        ds4_store4(rows[g].scs + j * W + h * D + ch, t[2 * j + 1]);
                    }
                }
            }
    }

    float4 c[G];
    float ss[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        merge_splits<D, SPLIT>(acc[g], emit[g], split, c4, sm);
        c[g] = pool_result(acc[g]);
        ss[g] = (split == 0 && emit[g]) ? sumsq4(c[g]) : 0.0f;
    }
    channel_sums<D, G>(ss, split, red);
    if (split != 0) return;
#pragma unroll
    for (int g = 0; g < G; ++g)
        if (emit[g]) {
            const RowTail t = G == 1 ? tail0 : load_tail<D>(norm_w, ch, rope_cos, rope_sin, p[g] + 1 - R);
            finish_row<TOut, D>(c[g], rms_scale(ss[g], D, eps), t, ch, cache + (b[g] * cache_rows + p[g] / R) * D);
        }
}
