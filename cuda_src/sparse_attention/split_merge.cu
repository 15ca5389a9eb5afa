// sparse_attention_split_merge — second pass of the split_k variant: merges the per-split partials
// (unnormalised o, running max m and sum l in base-2 units) that head_batched.cu's PARTIAL blocks
// wrote, adds the sink, applies the optional inverse RoPE and writes o (bf16) and lse.
//
// Thread layout: one block of 128 threads per (query row n, head h); thread t owns dims 4t .. 4t + 3
// (float4 loads of each split's partial).
//
// Bytes moved: reads N * H * splits * (512 + 2) * 4 bytes of partials (usually still in L2), writes
// N * H * 1 KB of output.
#include "sparse_attention_common.cuh"

__global__ void __launch_bounds__(128)
sparse_attention_split_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml, int splits, int H,
                             const float* __restrict__ sink, const void* __restrict__ positions, int pos64,
                             const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,
                             long long max_pos, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                             int* __restrict__ errors) {
    const long long nh = blockIdx.x;
    const long long n = nh / H;
    const int h = (int)(nh % H);
    const float2* ml = reinterpret_cast<const float2*>(part_ml) + nh * splits;
    // A split without a valid slot (l == 0) adds nothing; a NaN l (NaN in q) propagates.
    float M = DS4_NEG_INF;
    for (int s = 0; s < splits; ++s) {
        const float2 v = ml[s];
        if (v.y != 0.0f) M = fmaxf(M, v.x);
    }
    const float mu = M == DS4_NEG_INF ? 0.0f : M;
    const float4* po = reinterpret_cast<const float4*>(part_o + nh * splits * DS4_SA_DIM) + threadIdx.x;
    float L = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
        const float2 v = ml[s];
        if (v.y == 0.0f) continue;
        const float w = ds4_exp2(v.x - mu);
        const float4 o = po[s * (DS4_SA_DIM / 4)];
        L = __fmaf_rn(v.y, w, L);
        acc.x = __fmaf_rn(o.x, w, acc.x);
        acc.y = __fmaf_rn(o.y, w, acc.y);
        acc.z = __fmaf_rn(o.z, w, acc.z);
        acc.w = __fmaf_rn(o.w, w, acc.w);
    }
    const float inv = ds4_sa_inv_denominator(L, M, sink[h]);
    float x[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
    const int d = 4 * threadIdx.x;
    if (positions != nullptr && d >= DS4_SA_NOPE) {
        const long long pos = ds4_sa_position(positions, pos64, n);
        ds4_inverse_rope(x[0], x[1], rope_cos, rope_sin, pos, max_pos, (d - DS4_SA_NOPE) / 2);
        ds4_inverse_rope(x[2], x[3], rope_cos, rope_sin, pos, max_pos, (d - DS4_SA_NOPE) / 2 + 1);
        if (errors != nullptr && h == 0 && d == DS4_SA_NOPE && (pos < 0 || pos >= max_pos)) atomicAdd(errors, 1);
    }
    uint2 w;
    w.x = ds4_pack_bf16x2(x[0], x[1]);
    w.y = ds4_pack_bf16x2(x[2], x[3]);
    reinterpret_cast<uint2*>(out + nh * DS4_SA_DIM)[threadIdx.x] = w;
    if (lse != nullptr && threadIdx.x == 0) lse[nh] = ds4_sa_lse(L, M);
}
