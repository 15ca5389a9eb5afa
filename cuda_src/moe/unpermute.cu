// moe_unpermute: out[t] = sum over j = 0 .. k-1 with slot[t, j] >= 0 of
// weights[t, j] * y_perm[slot[t, j]], accumulated in float32 in that fixed order (each product
// and each sum rounded: __fmul_rn / __fadd_rn, so no fused multiply-add changes the result),
// stored in O (round to nearest even).  A token without a valid entry gets zeros.  A slot
// outside [-1, rows) is skipped and counted in *errors (once per entry, if errors is given).
//
// Thread layout: one block of DS4_MOE_UNPERMUTE_THREADS threads per token; a thread owns V
// consecutive channels (V = 8: 16-byte accesses, D % 8 == 0 and 16-byte aligned rows; V = 1:
// any layout) and walks the row by the block size.
//
// Bytes per token: (valid entries) * D * sizeof(Y) read, D * sizeof(O) written, 8 k of slots and
// weights.
#include "../common/common.cuh"

#define DS4_MOE_UNPERMUTE_THREADS 128

__device__ __forceinline__ void moe_load(const float* p, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void moe_load(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void moe_load(const __half* p, float (&v)[8]) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

template <typename Y>
__device__ __forceinline__ void moe_load(const Y* p, float (&v)[1]) { v[0] = ds4_to_float(__ldg(p)); }

__device__ __forceinline__ void moe_store(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void moe_store(__nv_bfloat16* p, const float (&v)[8]) {
    uint4 q;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = q;
}

__device__ __forceinline__ void moe_store(__half* p, const float (&v)[8]) {
    uint4 q;
    __half2* h = reinterpret_cast<__half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = q;
}

__device__ __forceinline__ void moe_store(float* p, const float (&v)[1]) { *p = v[0]; }
__device__ __forceinline__ void moe_store(__nv_bfloat16* p, const float (&v)[1]) { *p = __float2bfloat16_rn(v[0]); }
__device__ __forceinline__ void moe_store(__half* p, const float (&v)[1]) { *p = __float2half_rn(v[0]); }

template <typename Y, typename O, int V>
__global__ void __launch_bounds__(DS4_MOE_UNPERMUTE_THREADS)
moe_unpermute_rows(const Y* __restrict__ y, long long y_rs, long long rows, const int* __restrict__ slot,
                   const float* __restrict__ weights, int k, int D, O* __restrict__ out, long long o_rs,
                   int* __restrict__ errors) {
    static_assert(V == 1 || V == 8, "scalar or 16-byte accesses");
    const long long t = blockIdx.x;
    const int* s = slot + t * k;
    const float* w = weights + t * k;
    if (errors != nullptr && threadIdx.x == 0) {
        int bad = 0;
        for (int j = 0; j < k; ++j) {
            const int p = __ldg(s + j);
            bad += (p < -1 || p >= rows);
        }
        if (bad) atomicAdd(errors, bad);
    }
    for (int d = threadIdx.x * V; d < D; d += DS4_MOE_UNPERMUTE_THREADS * V) {
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.0f;
        for (int j = 0; j < k; ++j) {
            const int p = __ldg(s + j);
            if (p < 0 || p >= rows) continue;
            const float wj = __ldg(w + j);
            float v[V];
            moe_load(y + (long long)p * y_rs + d, v);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(wj, v[e]));
        }
        moe_store(out + t * o_rs + d, acc);
    }
}
