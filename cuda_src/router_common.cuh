// Score functions shared by the router kernels (folded into each source by ds4kern.kernels).
#pragma once
#include "common.cuh"

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

// ---- screening approximations and 16-byte unpacking (warp and rows kernels) ----
// Fast screening score for sqrtsoftplus: |approx - exact| <= DS4_SSP_ABS + DS4_SSP_REL * |s|,
// exact = ds4_unbiased (the precise score).  softplus(x) = max(x, 0) + log1p(t), t = e^-|x| in
// (0, 1] (one ex2.approx, no overflow), and log1p(t) = t * P(t) with P a polynomial fit of
// log1p(t) / t on [0, 1] (FMA pipe instead of a second MUFU op, bench/NOTES.md); then sqrt.approx.
// The degree (DS4_SSP_POLY) trades FMAs per value against the bound, i.e. against candidates:
// degree 3 (relative error ~5e-4 in log1p) with 5e-4 + 5e-4 |s| is the fastest measured (H100,
// Flash: 6.66 candidates per row against 6.47 at degree 6, 3-6% faster at T >= 65536); degree
// 6 (~3e-6) with 1e-5 + 1e-5 |s| was the library's before.  Every fit's bound was checked on an
// H100 over every finite float32 x: worst error 0.22 (degree 3), 0.11 (4), 0.17 (5), 0.075 (6)
// of its bound (the GPU probe tests ask for at most 1/3); the source keeps 3 and 6, NOTES the
// others' coefficients.  -DDS4_SSP_MUFU_LOG builds the first
// screen (1 + e^x through lg2.approx: absolute error ~1e-5 in softplus, ~3e-3 after the sqrt near
// 0, hence its bound of 5e-3) for A/B timing.
#ifdef DS4_SSP_MUFU_LOG
#define DS4_SSP_ABS 5e-3f
#define DS4_SSP_REL 1e-5f
__device__ __forceinline__ float ds4_sqrtsoftplus_approx(float x) {
    // .ftz forms: plain MUFU instructions (denormal softplus values are far below the bound)
    float t, l, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(x * 1.4426950408889634f));
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(1.0f + t));
    const float sp = x > 20.0f ? x : l * 0.6931471805599453f;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(sp));
    return r;
}
#else
#ifndef DS4_SSP_POLY  // degree of the log1p fit (-D overrides: bench/rows_ab.py --form)
#define DS4_SSP_POLY 3
#endif
#if DS4_SSP_POLY != 3 && DS4_SSP_POLY != 6
#error "DS4_SSP_POLY: 3 or 6 (the other fits measured are in bench/NOTES.md)"
#endif
#ifndef DS4_SSP_ABS  // each fit's bound (checked over every finite float32 x, bench/NOTES.md)
#define DS4_SSP_ABS (DS4_SSP_POLY == 3 ? 5e-4f : 1e-5f)
#define DS4_SSP_REL (DS4_SSP_POLY == 3 ? 5e-4f : 1e-5f)
#endif
__device__ __forceinline__ float ds4_sqrtsoftplus_approx(float x) {
    float t, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fabsf(x) * -1.4426950408889634f));
#if DS4_SSP_POLY == 3
    float p = -0.07626575231552124f;
    p = fmaf(p, t, 0.2569095492362976f);
    p = fmaf(p, t, -0.48749661445617676f);
    p = fmaf(p, t, 0.9996668696403503f);
#else
    float p = 0.01402662880718708f;
    p = fmaf(p, t, -0.06576914340257645f);
    p = fmaf(p, t, 0.1481052041053772f);
    p = fmaf(p, t, -0.234172523021698f);
    p = fmaf(p, t, 0.3307874798774719f);
    p = fmaf(p, t, -0.4998254179954529f);
    p = fmaf(p, t, 0.999997079372406f);
#endif
    // (x > 20: log1p(t) < 2.1e-9 vanishes in the addition, so sp = x as in the exact score)
    const float sp = fmaxf(x, 0.0f) + t * p;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(sp));
    return r;
}
#endif

#define DS4_SF_SOFTMAX_POST 0
#define DS4_SF_SIGMOID 1
#define DS4_SF_SQRTSOFTPLUS 2
#define DS4_SF_SOFTMAX_PRE 3
// sigmoid screen: 1 / (1 + 2^(-x log2 e)) with ex2/rcp.approx; |approx - exact| <= ABS + REL |s|,
// exact = ds4_unbiased (the precise sigmoid).  Checked on an H100 over every finite float32 x: the
// worst error is 0.17 of this bound (1.8e-7 absolute, 5.6e-7 relative where |s| > 1e-3; the GPU
// probe test asks for at most 1/3).  It was 4e-6 + 1e-5 |s| (0.014 of it): 5x-10x wider margins
// made ~0.5% of random V3-style rows near-ties of the group choice (bench/NOTES.md).
#ifndef DS4_SIG_ABS  // (-D overrides: bench/rows_ab.py --form)
#define DS4_SIG_ABS 2e-7f
#define DS4_SIG_REL 1e-6f
#endif

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

