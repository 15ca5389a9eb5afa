// The DeepSeek-V4 KV compressor's shared pieces (decode.cu, prefill.cu): softmax pool + RMSNorm +
// RoPE of one cache row.
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
// order.
//
// Exactness: decode and prefill share one pooling routine and every rounding step is spelled out
// (__fmaf_rn / __fmul_rn / __fadd_rn: no contraction choices left to the compiler), so prefill
// followed by decode reproduces decode alone bit for bit, and every G gives the same bits.
#pragma once
#include "../common/common.cuh"

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
