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
