// Shared pieces of the expert MLP kernels (naive.cu, grouped.cu): DeepSeek-V4's clamped SwiGLU,
// the clamped row range of an expert, and the cp.async / mma.sync wrappers of the tensor-core
// kernels.
//
// Clamped SwiGLU (swiglu_limit L > 0; L = 0 turns the clamp off), float32:
//   h = silu(min(g, L)) * clamp(u, -L, L),   silu(g) = g / (1 + exp(-g))
// The clamps propagate NaN, as torch.clamp does (fminf would replace a NaN by L).
#pragma once
#include "../common/common.cuh"

#define DS4_EM_THREADS 128         // grouped: 4 warps
#define DS4_EM_TILE_ROWS 64        // grouped: weight rows of a block tile, 16 per warp
#define DS4_EM_BK 64               // grouped: k per pipeline stage (one 128-byte line of each row)
#define DS4_EM_STAGES 4            // grouped: cp.async pipeline depth
#define DS4_EM_GU_FEATURES 32      // grouped gate_up: features per block (gate and up rows of each)
#define DS4_EM_MAX_EXPERTS 1024    // grouped: the item search holds up to 8 experts per thread
#define DS4_EM_NAIVE_THREADS 256   // naive: elementwise kernels

__device__ __forceinline__ float ds4_em_swiglu(float g, float u, float limit) {
    if (limit > 0.0f) {
        g = g > limit ? limit : g;
        u = u > limit ? limit : (u < -limit ? -limit : u);
    }
    return g / (1.0f + expf(-g)) * u;
}

// Rows [lo, lo + n) of expert e, with offsets[e] and offsets[e + 1] clamped to [0, N]; a
// decreasing pair gives n = 0.  The kernels never read or write a row outside [0, N).
__device__ __forceinline__ void ds4_em_expert_rows(const int* __restrict__ offsets, int e, int N, int& lo, int& n) {
    const int a = min(max(offsets[e], 0), N), b = min(max(offsets[e + 1], 0), N);
    lo = a;
    n = b > a ? b - a : 0;
}

__device__ __forceinline__ unsigned ds4_em_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; bytes < 16 zero-fills the rest (0: no global read at all).
__device__ __forceinline__ void ds4_em_cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ds4_em_smem_addr(dst)), "l"(src),
                 "r"(bytes));
}
__device__ __forceinline__ void ds4_em_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void ds4_em_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// d += a (16x16 bf16, row) * b (16x8 bf16, col), float32 accumulators.  Fragments (g = lane / 4,
// t = lane % 4): a0 (row g, k 2t, 2t+1), a1 (row g+8, k 2t, 2t+1), a2 (row g, k 2t+8, 2t+9),
// a3 (row g+8, k 2t+8, 2t+9); b0 (k 2t, 2t+1, col g), b1 (k 2t+8, 2t+9, col g); d0, d1 (row g,
// cols 2t, 2t+1), d2, d3 (row g+8, cols 2t, 2t+1); the lower k / col sits in the low half.
__device__ __forceinline__ void ds4_em_mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                           unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two floats -> a bf16x2 word (round to nearest even), the first in the low half.
__device__ __forceinline__ unsigned ds4_em_pack_bf16(float lo, float hi) {
    const unsigned short a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const unsigned short b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return (unsigned)a | ((unsigned)b << 16);
}
