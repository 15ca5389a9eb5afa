// compressor.cu — DeepSeek-V4 KV compressor: softmax pool + RMSNorm + RoPE (decode and prefill).
//
// Every R tokens of a sequence become one cache row: per channel, a softmax-weighted pool of the
// window's rows (R = 128), or of an overlapped 8-row window (R = 4: the previous window's front
// D channels and this window's back D channels), computed online in one pass (running max m,
// sum l, accumulator o); then RMSNorm, then interleaved RoPE on the last 64 channels at the
// window's start position p + 1 - R; the row goes to cache[b, p / R].
//
// Thread layout: a block has CH = D / 4 channel threads (4 consecutive channels each, 16-byte
// state accesses) times SPLIT row groups.  With SPLIT > 1 (R = 128 only) each group pools a
// contiguous run of window rows and the partial (m, l, o) are merged in shared memory, in group
// order.  compress_decode<..., G, SPLIT> handles G batch rows per block, each with its own
// accumulators, unrolled at compile time (G = 1: the naive variant; G = 2, 4, 8: grouped).
//
// Bytes per decode step and emitting batch row (float32 state): R = 128: the 127 older window
// rows of kv and score state (2 * 127 * D * 4), the token (2 * D * sizeof(TIn)), its state row
// (2 * D * 4) and the cache row written.  R = 4: rows 0-3 front and rows 4-6 both halves read,
// rows 0-3 and 7 written, for both arrays (2 * 20 * D * 4).  A row that does not emit only writes
// its token to the state (2 * COFF * D * 4).
//
// Exactness: decode and prefill share one pooling routine and every rounding step is spelled out
// (__fmaf_rn / __fmul_rn / __fadd_rn: no contraction choices left to the compiler), so prefill
// followed by decode reproduces decode alone bit for bit, and every G gives the same bits.
#include "common.cuh"

__device__ __forceinline__ float4 ds4_load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 ds4_load4(const __nv_bfloat16* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 ds4_load4(const __half* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ void ds4_store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void ds4_store4(__nv_bfloat16* p, float4 v) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<unsigned*>(&a);
    u.y = *reinterpret_cast<unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void ds4_store4(__half* p, float4 v) {
    __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<unsigned*>(&a);
    u.y = *reinterpret_cast<unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
}

__device__ __forceinline__ float4 ds4_add4(float4 a, float4 b) {
    return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z), __fadd_rn(a.w, b.w));
}

// Online softmax-pool state of 4 channels.
struct PoolAcc {
    float m[4], l[4], o[4];
};

__device__ __forceinline__ void pool_init(PoolAcc& a) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        a.m[i] = DS4_NEG_INF;
        a.l[i] = 0.0f;
        a.o[i] = 0.0f;
    }
}

// One row into one channel: one exponential per element.  A -inf score adds nothing (so a window
// of -inf scores keeps l = 0 and pools to zero, never NaN).
__device__ __forceinline__ void pool_add1(float& m, float& l, float& o, float s, float k) {
    if (s == DS4_NEG_INF) return;
    if (s > m) {
        const float e = __expf(m - s);  // m = -inf: e = 0
        l = __fmaf_rn(l, e, 1.0f);
        o = __fmaf_rn(o, e, k);
        m = s;
    } else {
        const float e = __expf(s - m);
        l = __fadd_rn(l, e);
        o = __fmaf_rn(e, k, o);
    }
}

__device__ __forceinline__ void pool_add(PoolAcc& a, float4 s, float4 k) {
    pool_add1(a.m[0], a.l[0], a.o[0], s.x, k.x);
    pool_add1(a.m[1], a.l[1], a.o[1], s.y, k.y);
    pool_add1(a.m[2], a.l[2], a.o[2], s.z, k.z);
    pool_add1(a.m[3], a.l[3], a.o[3], s.w, k.w);
}

// a := merge(a, (m2, l2, o2)) for one channel.
__device__ __forceinline__ void pool_merge1(float& m, float& l, float& o, float m2, float l2, float o2) {
    const float mm = fmaxf(m, m2);
    if (mm == DS4_NEG_INF) return;
    const float a1 = __expf(m - mm), a2 = __expf(m2 - mm);
    l = __fmaf_rn(l, a1, __fmul_rn(l2, a2));
    o = __fmaf_rn(o, a1, __fmul_rn(o2, a2));
    m = mm;
}

template <int R, int SPLIT>
struct PoolShape {
    static constexpr int ROWS = R == 4 ? 8 : R;     // window rows
    static constexpr int PER_SPLIT = ROWS / SPLIT;  // rows pooled by one row group
};

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


// Pool this thread's rows (row group `split`) of G windows; rows are loaded U at a time per
// window before any is folded in, so G * U row pairs are in flight per thread.
template <int R, int SPLIT, int G, class Rows>
__device__ __forceinline__ void pool_rows(const Rows (&rows)[G], const bool (&on)[G], PoolAcc (&acc)[G], int split) {
    constexpr int PS = PoolShape<R, SPLIT>::PER_SPLIT;
    constexpr int U0 = (R == 4 || G < 4 ? 8 : 4) / G;
    constexpr int U = U0 < 1 ? 1 : (U0 > PS ? PS : U0);
    static_assert(PS % U == 0, "rows per split must be a multiple of the load batch");
    const int j0 = split * PS;
#pragma unroll 1
    for (int jj = 0; jj < PS; jj += U) {
        float4 k[G][U], s[G][U];
#pragma unroll
        for (int g = 0; g < G; ++g)
            if (on[g]) {
#pragma unroll
                for (int u = 0; u < U; ++u) rows[g].load(j0 + jj + u, k[g][u], s[g][u]);
            }
#pragma unroll
        for (int g = 0; g < G; ++g)
            if (on[g]) {
#pragma unroll
                for (int u = 0; u < U; ++u) pool_add(acc[g], s[g][u], k[g][u]);
            }
    }
}

// Shared memory to merge row groups: (m, l, o) of every channel of groups 1..SPLIT-1.
template <int D, int SPLIT>
struct MergeSmem {
    float4 m[SPLIT - 1][D / 4];
    float4 l[SPLIT - 1][D / 4];
    float4 o[SPLIT - 1][D / 4];
};
template <int D>
struct MergeSmem<D, 1> {};

// Merge row groups into split 0's accumulator (every thread of the block must call this).
template <int D, int SPLIT>
__device__ __forceinline__ void merge_splits(PoolAcc& a, bool on, int split, int c4, MergeSmem<D, SPLIT>& sm) {
    if constexpr (SPLIT > 1) {
    if (on && split > 0) {
        sm.m[split - 1][c4] = make_float4(a.m[0], a.m[1], a.m[2], a.m[3]);
        sm.l[split - 1][c4] = make_float4(a.l[0], a.l[1], a.l[2], a.l[3]);
        sm.o[split - 1][c4] = make_float4(a.o[0], a.o[1], a.o[2], a.o[3]);
    }
    __syncthreads();
    if (on && split == 0) {
#pragma unroll 1
        for (int s = 0; s < SPLIT - 1; ++s) {
            const float4 m = sm.m[s][c4], l = sm.l[s][c4], o = sm.o[s][c4];
            pool_merge1(a.m[0], a.l[0], a.o[0], m.x, l.x, o.x);
            pool_merge1(a.m[1], a.l[1], a.o[1], m.y, l.y, o.y);
            pool_merge1(a.m[2], a.l[2], a.o[2], m.z, l.z, o.z);
            pool_merge1(a.m[3], a.l[3], a.o[3], m.w, l.w, o.w);
        }
    }
    __syncthreads();
    }
}

__device__ __forceinline__ float4 pool_result(const PoolAcc& a) {
    float c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = a.l[i] > 0.0f ? __fdiv_rn(a.o[i], a.l[i]) : 0.0f;
    return make_float4(c[0], c[1], c[2], c[3]);
}

__device__ __forceinline__ float sumsq4(float4 c) {
    return __fmaf_rn(c.w, c.w, __fmaf_rn(c.z, c.z, __fmaf_rn(c.y, c.y, __fmul_rn(c.x, c.x))));
}

// What the end of a row needs besides the pool: this thread's RMSNorm weights and, for the
// last 64 channels, cos/sin of its two pairs at the window's start (loaded early where it helps).
struct RowTail {
    float4 w;
    float2 cs, sn;
};

template <int D>
__device__ __forceinline__ RowTail load_tail(const float* __restrict__ norm_w, int ch, const float* __restrict__ rope_cos,
                                             const float* __restrict__ rope_sin, long long rope_pos) {
    RowTail t;
    t.w = ds4_load4(norm_w + ch);
    if (ch >= D - 64) {
        const int i = (ch - (D - 64)) >> 1;  // frequency of the pair (ch, ch + 1); (ch + 2, ch + 3) is i + 1
        t.cs = *reinterpret_cast<const float2*>(rope_cos + rope_pos * 32 + i);
        t.sn = *reinterpret_cast<const float2*>(rope_sin + rope_pos * 32 + i);
    }
    return t;
}

// RMSNorm and RoPE of one pooled row, stored to the cache (split-0 threads; `rs` already holds
// rsqrt(mean(c^2) + eps)).
template <typename TOut, int D>
__device__ __forceinline__ void finish_row(float4 c, float rs, const RowTail& t, int ch, TOut* __restrict__ dst) {
    float4 y = make_float4(__fmul_rn(__fmul_rn(c.x, rs), t.w.x), __fmul_rn(__fmul_rn(c.y, rs), t.w.y),
                           __fmul_rn(__fmul_rn(c.z, rs), t.w.z), __fmul_rn(__fmul_rn(c.w, rs), t.w.w));
    if (ch >= D - 64) {
        const float4 x = y;
        y.x = __fmaf_rn(x.x, t.cs.x, -__fmul_rn(x.y, t.sn.x));
        y.y = __fmaf_rn(x.x, t.sn.x, __fmul_rn(x.y, t.cs.x));
        y.z = __fmaf_rn(x.z, t.cs.y, -__fmul_rn(x.w, t.sn.y));
        y.w = __fmaf_rn(x.z, t.sn.y, __fmul_rn(x.w, t.cs.y));
    }
    ds4_store4(dst + ch, y);
}

__device__ __forceinline__ float rms_scale(float sumsq, int d, float eps) {
    return rsqrtf(__fadd_rn(__fdiv_rn(sumsq, (float)d), eps));
}

// Sum over the CH channel threads of row group 0 for G rows at once; every thread gets the sums.
template <int D, int G>
__device__ __forceinline__ void channel_sums(float (&v)[G], int split, float (*red)[D / 128 > 0 ? D / 128 : 1]) {
    constexpr int NW = D / 128 > 0 ? D / 128 : 1;  // warps of row group 0 (D / 4 threads)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int g = 0; g < G; ++g) v[g] = ds4_warp_sum(v[g]);
    if (NW > 1) {
        if (split == 0 && lane == 0) {
#pragma unroll
            for (int g = 0; g < G; ++g) red[g][warp] = v[g];
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float t = red[g][0];
#pragma unroll
            for (int w = 1; w < NW; ++w) t = __fadd_rn(t, red[g][w]);
            v[g] = t;
        }
    }
}

__device__ __forceinline__ long long ds4_load_pos(const void* p, int is64, long long i) {
    return is64 ? static_cast<const long long*>(p)[i] : (long long)static_cast<const int*>(p)[i];
}

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
