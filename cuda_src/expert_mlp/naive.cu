// The elementwise kernels of expert_mlp's naive variant, which runs each touched expert's three
// matrix products as float32 cuBLAS GEMMs (CuPy) between them:
//   expert_mlp_widen:  bf16 matrix [rows, cols] (any element strides) -> float32, contiguous
//   expert_mlp_swiglu: g <- bf16(swiglu(g, u)) in place (float32 [n], the bf16 value as float)
//   expert_mlp_store<T>: float32 [n] -> T [n] (bf16 rounded to nearest even, or float32)
// One thread per element in a grid-stride loop of 256-thread blocks; each moves its bytes once.
#include "expert_mlp_common.cuh"

__global__ void __launch_bounds__(DS4_EM_NAIVE_THREADS)
expert_mlp_widen(const __nv_bfloat16* __restrict__ src, long long row_stride, long long col_stride, long long rows,
                 long long cols, float* __restrict__ dst) {
    const long long n = rows * cols;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const long long r = i / cols, c = i - r * cols;
        dst[i] = __bfloat162float(src[r * row_stride + c * col_stride]);
    }
}

__global__ void __launch_bounds__(DS4_EM_NAIVE_THREADS)
expert_mlp_swiglu(float* __restrict__ g, const float* __restrict__ u, long long n, float limit) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        g[i] = __bfloat162float(__float2bfloat16_rn(ds4_em_swiglu(g[i], u[i], limit)));
}

__device__ __forceinline__ void em_put(float* p, float v) { *p = v; }
__device__ __forceinline__ void em_put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(DS4_EM_NAIVE_THREADS)
expert_mlp_store(const float* __restrict__ src, long long n, T* __restrict__ dst) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        em_put(dst + i, src[i]);
}
