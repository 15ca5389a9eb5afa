// Router building blocks shared by the compact router's kernels and the TE forms: score functions,
// order keys back to values, the exact selection score, the fast screening scores with their error
// bounds, 16-byte unpacking, and the warp helpers of one selection round.
#pragma once
#include "../common/common.cuh"

#define DS4_SCORE_SOFTMAX 0
#define DS4_SCORE_SIGMOID 1
#define DS4_SCORE_SQRTSOFTPLUS 2

__device__ __forceinline__ float ds4_score_fn(float x, int score_fn) {
    // __frcp_rn(y) is the correctly rounded 1 / y: the same bits as the division, fewer instructions
    if (score_fn == DS4_SCORE_SIGMOID) return __frcp_rn(1.0f + expf(-x));
    // sqrt(softplus(x)), softplus(x) = x for x > 20 (as in the spec and TE).  Below -20,
    // log1p(t) == t in float32 (t = e^x < 2^-28), so expf alone gives the same value cheaper.
    const float sp = x > 20.0f ? x : (x < -20.0f ? expf(x) : log1pf(expf(x)));
    return sqrtf(sp);
}

// Inverse of ds4_order_key for keys >= 2 (numbers).
__device__ __forceinline__ float ds4_key_to_float(unsigned key) {
    const unsigned u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    return __uint_as_float(u);
}

// Value of a key in a group sum (key 1 is NaN).
__device__ __forceinline__ float ds4_key_value(unsigned key) {
    return key == 1u ? __int_as_float(0x7fffffff) : ds4_key_to_float(key);
}

// Exact selection score of one expert (what the reference computes, in float32).
__device__ __forceinline__ float ds4_sel_score(float x, int e, int score_fn, bool pre, float mx, float denom,
                                               const float* __restrict__ bias) {
    if (score_fn == DS4_SCORE_SOFTMAX) return pre ? expf(x - mx) / denom : x;
    float s = ds4_score_fn(x, score_fn);
    if (bias != nullptr) s += bias[e];
    return s;
}

// ---- screening approximations and 16-byte unpacking (threshold, warp and rows kernels) ----
// Fast screening score for sqrtsoftplus: |approx - exact| <= DS4_SSP_ABS + DS4_SSP_REL * |s|,
// exact = ds4_unbiased (the precise score).  softplus(x) = max(x, 0) + log1p(t), t = e^-|x| in
// (0, 1] (one ex2.approx, no overflow), and log1p(t) = t * P(t) with P a degree-3 polynomial fit of
// log1p(t) / t on [0, 1] (FMA pipe instead of a second MUFU op; relative error ~5e-4 in log1p);
// then sqrt.approx.  A higher degree tightens the bound (fewer candidates) for more FMAs per value;
// degree 3 was the fastest measured (bench/lab/NOTEBOOK.md has the other fits).  The bound was
// checked on an H100 over every finite float32 x: the worst error is 0.22 of it (the GPU probe
// tests ask for at most 1/3).
#define DS4_SSP_ABS 5e-4f
#define DS4_SSP_REL 5e-4f

__device__ __forceinline__ float ds4_sqrtsoftplus_approx(float x) {
    float t, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fabsf(x) * -1.4426950408889634f));
    float p = -0.07626575231552124f;
    p = fmaf(p, t, 0.2569095492362976f);
    p = fmaf(p, t, -0.48749661445617676f);
    p = fmaf(p, t, 0.9996668696403503f);
    // (x > 20: log1p(t) < 2.1e-9 vanishes in the addition, so sp = x as in the exact score)
    const float sp = fmaxf(x, 0.0f) + t * p;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(sp));
    return r;
}

#define DS4_SF_SOFTMAX_POST 0
#define DS4_SF_SIGMOID 1
#define DS4_SF_SQRTSOFTPLUS 2
#define DS4_SF_SOFTMAX_PRE 3
// sigmoid screen: 1 / (1 + 2^(-x log2 e)) with ex2/rcp.approx; |approx - exact| <= ABS + REL |s|,
// exact = ds4_unbiased (the precise sigmoid).  Checked on an H100 over every finite float32 x: the
// worst error is 0.17 of this bound (1.8e-7 absolute, 5.6e-7 relative where |s| > 1e-3; the GPU
// probe test asks for at most 1/3).  Wider margins make near-ties of the group choice more
// frequent: at 4e-6 + 1e-5 |s|, ~0.5% of random V3-style rows (bench/lab/NOTEBOOK.md).
#define DS4_SIG_ABS 2e-7f
#define DS4_SIG_REL 1e-6f

__device__ __forceinline__ float ds4_sigmoid_approx(float x) {
    float t, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(x * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + t));
    return r;
}

// The screen's error bound for score function SF at a score of magnitude a (>= 0): the approximate
// score is within this of the precise one (DS4_SIG_* for sigmoid, DS4_SSP_* for sqrtsoftplus).
template <int SF>
__device__ __forceinline__ float ds4_screen_err(float a) {
    return SF == DS4_SF_SIGMOID ? DS4_SIG_ABS + DS4_SIG_REL * a : DS4_SSP_ABS + DS4_SSP_REL * a;
}

__device__ __forceinline__ float ds4_bits16_to_float(unsigned short h, const __half*) {
    return __half2float(__ushort_as_half(h));
}
__device__ __forceinline__ float ds4_bits16_to_float(unsigned short h, const __nv_bfloat16*) {
    return __uint_as_float((unsigned)h << 16);
}

// 16 bytes of T as floats into x[c * (16 / sizeof(T)) ...]
template <typename T, int VPL>
__device__ __forceinline__ void ds4_unpack16(const uint4 u, int c, float (&x)[VPL]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if constexpr (sizeof(T) == 4) {
            x[4 * c + j] = __uint_as_float(w[j]);
        } else {
            x[8 * c + 2 * j] = ds4_bits16_to_float((unsigned short)(w[j] & 0xffffu), (const T*)nullptr);
            x[8 * c + 2 * j + 1] = ds4_bits16_to_float((unsigned short)(w[j] >> 16), (const T*)nullptr);
        }
    }
}

template <int SF>
__device__ __forceinline__ float ds4_unbiased(float x) {  // sigmoid / sqrtsoftplus, precise
    return ds4_score_fn(x, SF == DS4_SF_SIGMOID ? DS4_SCORE_SIGMOID : DS4_SCORE_SQRTSOFTPLUS);
}

// ---- warp helpers of one selection round (naive rounds, warp kernel, TE forms) ----

// Rank of group `mine` among the num_groups group keys (lane h * stride holds group h's key; every
// lane calls it): the groups with a larger key, or an equal key and a lower id, before it.  The
// top group_topk groups are those of rank < group_topk.  One round of independent shuffles and
// compares (num_groups <= 32), not group_topk dependent rounds of warp reductions.
__device__ __forceinline__ int ds4_group_rank(unsigned gk, int mine, int stride, int num_groups) {
    int rank = 0;
#pragma unroll 8
    for (int h = 0; h < num_groups; ++h) {
        const unsigned kh = __shfl_sync(0xffffffffu, gk, h * stride);
        rank += (kh > gk || (kh == gk && h < mine)) ? 1 : 0;
    }
    return rank;
}

// One round of warp arg-max over the keys this lane holds, key[i] for expert base + stride * i
// (larger key first, lower expert on ties); the owner clears the winner's key.  Returns the
// winner; `slot` is the owner's register slot, -1 on every other lane.
template <int VPL>
__device__ __forceinline__ int ds4_select_round(unsigned (&key)[VPL], int base, int stride, int& slot) {
    unsigned bk = 0u;
    int be = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (key[i] > bk) { bk = key[i]; be = base + stride * i; }
    const unsigned wk = __reduce_max_sync(0xffffffffu, bk);
    const int e = (int)__reduce_min_sync(0xffffffffu, bk == wk ? (unsigned)be : 0xffffffffu);
    slot = -1;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
        if (base + stride * i == e) {
            key[i] = 0u;
            slot = i;
        }
    return e;
}

// A group score: the sum of the group's top m keys' values, added largest first (as the reference
// does).  Each round takes this lane's best key not yet counted among the slots `in(i)` admits
// (expert `expert(i)`), `best(bk, be)` makes it the best of the group's lanes (larger key, then
// lower expert), and the owner's slot is marked counted (a bit per slot: VPL <= 32).
template <int VPL, typename In, typename Expert, typename Best>
__device__ __forceinline__ float ds4_group_score(const unsigned (&key)[VPL], int m, In in, Expert expert, Best best) {
    unsigned taken = 0u;
    float sum = 0.0f;
    for (int r = 0; r < m; ++r) {
        unsigned bk = 0u;
        int be = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (in(i) && !((taken >> i) & 1u) && key[i] > bk) { bk = key[i]; be = expert(i); }
        best(bk, be);
#pragma unroll
        for (int i = 0; i < VPL; ++i)
            if (expert(i) == be) taken |= 1u << i;
        const float v = ds4_key_value(bk);
        sum = r == 0 ? v : sum + v;
    }
    return sum;
}
