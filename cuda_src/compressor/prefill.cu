// compress_prefill_emit<TIn, TOut, R, D, SPLIT> and compress_prefill_state<TIn, R, D> — a prefill
// of S tokens per batch row for the DeepSeek-V4 KV compressor (pool, RMSNorm and RoPE:
// compressor_common.cuh): every cache row it emits, then the state decode steps would have left.
//
// Thread layout: emit: grid (S / R + 1, batch), D / 4 * SPLIT threads, one window per block;
// state: one block of 256 threads per batch row.
//
// Bytes: emit reads each window's rows of kv and score once (R = 4: each half of a token once; the
// state's rows for a window that starts before `start`) and ape, and writes S / R cache rows per
// batch row; state reads at most the last R positions' rows (R = 4: 8 rows) of each batch row and
// writes its state (2 * SR * W * 4).
#include "../common/common.cuh"
#include "compressor_common.cuh"

// Window rows as prefill sees them: positions >= start come from the token inputs, older ones
// from the state the sequence had at `start` (see compress_prefill_state for its layout).
template <typename TIn, int R, int D>
struct PrefillRows {
    const TIn* kv;      // this batch row's tokens [S, W]
    const TIn* score;
    const float* ape;   // [R, W]
    const float* kvs;   // state at start
    const float* scs;
    long long start, e;  // first token's position; the emitting position of this window
    int ch;

    __device__ __forceinline__ void load(int j, float4& k, float4& s) const {
        constexpr int W = (R == 4 ? 2 : 1) * D;
        const int half = (R == 4 && j >= 4) ? D : 0;
        const long long q = e - (PoolShape<R, 1>::ROWS - 1) + j;  // R = 4: rows 0-3 front, 4-7 back
        if (q >= start) {
            const long long t = q - start;
            const int r = (int)(q % R);
            k = ds4_load4(kv + t * W + half + ch);
            s = ds4_add4(ds4_load4(score + t * W + half + ch), ds4_load4(ape + r * W + half + ch));
            return;
        }
        int row;
        if (R == 4) row = q >= (start & ~3LL) ? 4 + (int)(q & 3) : (int)(q & 3);
        else row = (int)(q % R);
        k = ds4_load4(kvs + row * W + half + ch);
        s = ds4_load4(scs + row * W + half + ch);
    }
};

// Validity of a prefill row (both prefill kernels agree on it): start >= 0, the cache row of
// every position exists, and the last emitted row's RoPE position lies in the table.
template <int R>
__device__ __forceinline__ bool prefill_ok(long long st, long long S, long long cache_rows, long long max_pos) {
    if (st < 0 || (st + S - 1) / R >= cache_rows) return false;
    const long long e_last = ((st + S) / R) * R - 1;  // last emitting position < st + S
    return e_last < st || e_last + 1 - R < max_pos;
}

__device__ __forceinline__ long long ds4_start(const void* starts, int kind, long long scalar, long long b) {
    return kind == 0 ? scalar : ds4_load_pos(starts, kind == 2, b);
}

// compress_prefill_emit: every cache row of a prefill of S tokens per batch row.  Grid
// (S / R + 1, batch); block w of row b pools the w-th window that ends in [start, start + S).
// Reads the state as it was at `start`; compress_prefill_state (launched after) updates it.
template <typename TIn, typename TOut, int R, int D, int SPLIT>
__global__ void __launch_bounds__(D / 4 * SPLIT)
compress_prefill_emit(const TIn* __restrict__ kv, const TIn* __restrict__ score, long long S,
                      const float* __restrict__ ape, const float* __restrict__ norm_w,
                      const void* __restrict__ starts, int start_kind, long long start_scalar,
                      const float* __restrict__ rope_cos, const float* __restrict__ rope_sin, long long max_pos,
                      const float* __restrict__ kv_state, const float* __restrict__ score_state,
                      TOut* __restrict__ cache, long long cache_rows, float eps) {
    constexpr int COFF = R == 4 ? 2 : 1;
    constexpr int W = COFF * D;
    constexpr int SR = COFF * R;
    constexpr int CH = D / 4;
    __shared__ MergeSmem<D, SPLIT> sm;
    __shared__ float red[1][D / 128 > 0 ? D / 128 : 1];

    const long long b = blockIdx.y;
    const long long st = ds4_start(starts, start_kind, start_scalar, b);
    if (!prefill_ok<R>(st, S, cache_rows, max_pos)) return;  // block-uniform
    const long long e = (st / R) * R + (R - 1) + (long long)blockIdx.x * R;
    if (e >= st + S) return;  // block-uniform
    const int c4 = threadIdx.x % CH, split = threadIdx.x / CH, ch = 4 * c4;
    PrefillRows<TIn, R, D> rows[1];
    rows[0].kv = kv + b * S * W;
    rows[0].score = score + b * S * W;
    rows[0].ape = ape;
    rows[0].kvs = kv_state + b * (long long)SR * W;
    rows[0].scs = score_state + b * (long long)SR * W;
    rows[0].start = st;
    rows[0].e = e;
    rows[0].ch = ch;
    const bool on[1] = {true};
    PoolAcc acc[1];
    pool_init(acc[0]);
    pool_rows<R, SPLIT, 1>(rows, on, acc, split);
    merge_splits<D, SPLIT>(acc[0], true, split, c4, sm);
    const float4 c = pool_result(acc[0]);
    float ss[1] = {split == 0 ? sumsq4(c) : 0.0f};
    channel_sums<D, 1>(ss, split, red);
    if (split != 0) return;
    const RowTail t = load_tail<D>(norm_w, ch, rope_cos, rope_sin, e + 1 - R);
    finish_row<TOut, D>(c, rms_scale(ss[0], D, eps), t, ch, cache + (b * cache_rows + e / R) * D);
}

// compress_prefill_state: the state after the prefill, as decode steps would leave it.  Grid:
// batch blocks.  R = 128: row j holds the last position q < end with q % R == j.  R = 4: row 4 + j
// holds the last position q < end with q % 4 == j; row j holds position e - 3 + j of the last
// emission e in [start, end) (taken from the old row 4 + j if that position is older than start).
// A thread owns the same channels of rows j and 4 + j, so it reads an old row before replacing it.
template <typename TIn, int R, int D>
__global__ void __launch_bounds__(256)
compress_prefill_state(const TIn* __restrict__ kv, const TIn* __restrict__ score, long long S,
                       const float* __restrict__ ape, const void* __restrict__ starts, int start_kind,
                       long long start_scalar, long long max_pos, float* __restrict__ kv_state,
                       float* __restrict__ score_state, long long cache_rows, int* __restrict__ errors) {
    constexpr int COFF = R == 4 ? 2 : 1;
    constexpr int W = COFF * D;
    constexpr int SR = COFF * R;
    const long long b = blockIdx.x;
    const long long st = ds4_start(starts, start_kind, start_scalar, b);
    if (!prefill_ok<R>(st, S, cache_rows, max_pos)) {
        if (threadIdx.x == 0 && errors != nullptr) atomicAdd(errors, 1);
        return;
    }
    const long long end = st + S;
    float* kvs = kv_state + b * (long long)SR * W;
    float* scs = score_state + b * (long long)SR * W;
    const TIn* kin = kv + b * S * W;
    const TIn* sin_ = score + b * S * W;
    constexpr int NJ = R == 4 ? 4 : R;  // R = 4: j covers rows j and 4 + j
    const long long e = (end / 4) * 4 - 1;  // R = 4: last emission before end
    for (int i = threadIdx.x; i < NJ * (W / 4); i += blockDim.x) {
        const int j = i / (W / 4), x = 4 * (i % (W / 4));
        const long long q = end - 1 - ((end - 1 - j) % R + R) % R;  // last position < end in row class j
        float4 nk, ns;
        bool have = q >= st;
        if (have) {
            const long long t = q - st;
            nk = ds4_load4(kin + t * W + x);
            ns = ds4_add4(ds4_load4(sin_ + t * W + x), ds4_load4(ape + j * W + x));
        }
        if (R == 4) {
            if (e >= st) {  // an emission happened: row j := position e - 3 + j
                const long long qe = e - 3 + j;
                float4 fk, fs;
                if (qe >= st) {
                    const long long t = qe - st;
                    fk = ds4_load4(kin + t * W + x);
                    fs = ds4_add4(ds4_load4(sin_ + t * W + x), ds4_load4(ape + j * W + x));
                } else {
                    fk = ds4_load4(kvs + (4 + j) * W + x);
                    fs = ds4_load4(scs + (4 + j) * W + x);
                }
                ds4_store4(kvs + j * W + x, fk);
                ds4_store4(scs + j * W + x, fs);
            }
            if (have) {
                ds4_store4(kvs + (4 + j) * W + x, nk);
                ds4_store4(scs + (4 + j) * W + x, ns);
            }
        } else if (have) {
            ds4_store4(kvs + j * W + x, nk);
            ds4_store4(scs + j * W + x, ns);
        }
    }
}
