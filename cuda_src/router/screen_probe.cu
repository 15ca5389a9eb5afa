// Test probes of the screening approximations (diagnostic kernels for the GPU tests' error-bound
// checks, launched by no op): the fast screen next to the precise score, one thread per value.
// Bytes: n*4 read, n*8 written.
#include "../common/common.cuh"
#include "router_common.cuh"

// Test probe: the screening approximation next to the precise score, for the error-bound test.
template <int UNUSED>
__global__ void router_ssp_approx_probe(const float* __restrict__ x, float* __restrict__ approx,
                                        float* __restrict__ exact, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    approx[i] = ds4_sqrtsoftplus_approx(x[i]);
    exact[i] = ds4_score_fn(x[i], DS4_SCORE_SQRTSOFTPLUS);
}

// Test probe: a screening approximation next to the precise score (SF 1: sigmoid, 2: sqrtsoftplus).
template <int SF>
__global__ void router_screen_probe(const float* __restrict__ x, float* __restrict__ approx,
                                    float* __restrict__ exact, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    approx[i] = SF == DS4_SF_SIGMOID ? ds4_sigmoid_approx(x[i]) : ds4_sqrtsoftplus_approx(x[i]);
    exact[i] = ds4_unbiased<SF>(x[i]);
}
