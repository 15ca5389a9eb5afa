// sparse_attention_pack_fp8 / sparse_attention_unpack_fp8 — the FP8 KV row layout (FlashMLA's
// DeepSeek-V4 layout, one whole 584-byte row per slot): bytes 0-447 the 448 nope values in e4m3,
// 448-575 the 64 rope values in bf16, 576-582 seven ue8m0 scales (one per 64 nope values), 583 zero.
// Quantisation per 64-value tile: scale = the power of two at or above amax / 448 (amax over the
// tile's finite values; clamped to [2^-126, 2^127]), value = x / scale rounded to nearest even e4m3
// (NaN and inf become 0x7f, e4m3 NaN).  Bit for bit the same as reference.py.
//
// Thread layout: one warp per row, 4 rows per 128-thread block.  Lanes 0-27 take 16 nope values
// each (a tile is 4 lanes: its amax is a 4-lane shuffle), lanes 28-31 move 16 rope values each.
//
// Bytes moved: pack reads 1024 B and writes 584 B per row; unpack the reverse.
#include "sparse_attention_common.cuh"

__global__ void __launch_bounds__(128)
sparse_attention_pack_fp8(const __nv_bfloat16* __restrict__ kv, long long rows, unsigned char* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= rows) return;  // warp-uniform
    const uint4* src = reinterpret_cast<const uint4*>(kv + row * DS4_SA_DIM) + 2 * lane;
    unsigned char* dst = out + row * DS4_SA_FP8_ROW;
    const uint4 a = src[0], b = src[1];
    const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float v[16], amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);  // bf16 -> float by its bits: exact, subnormals kept
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const float x = fabsf(v[i]);
        if (x <= 3.40282347e38f) amax = fmaxf(amax, x);  // finite values only (FLT_MAX)
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    if (lane < 28) {
        const int k = ds4_tile_exponent(amax);
        const float inv = __uint_as_float((unsigned)(127 - k) << 23);  // 2^-k, exact
        unsigned c[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int i = 0; i < 16; ++i) c[i / 4] |= ds4_float_to_e4m3(ds4_mul_keep_subnormals(v[i], inv)) << (8 * (i % 4));
        uint2* d = reinterpret_cast<uint2*>(dst + 16 * lane);
        d[0] = make_uint2(c[0], c[1]);
        d[1] = make_uint2(c[2], c[3]);
        if ((lane & 3) == 0) dst[DS4_SA_FP8_SCALE_OFF + lane / 4] = (unsigned char)(k + 127);
    } else {
        uint2* d = reinterpret_cast<uint2*>(dst + DS4_SA_FP8_ROPE_OFF + 32 * (lane - 28));
        d[0] = make_uint2(a.x, a.y);
        d[1] = make_uint2(a.z, a.w);
        d[2] = make_uint2(b.x, b.y);
        d[3] = make_uint2(b.z, b.w);
        if (lane == 31) dst[DS4_SA_FP8_ROW - 1] = 0;
    }
}

// packed rows may be strided (stride a multiple of 8 bytes); out is [rows, 512] contiguous.
__global__ void __launch_bounds__(128)
sparse_attention_unpack_fp8(const unsigned char* __restrict__ packed, long long stride, long long rows,
                            __nv_bfloat16* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= rows) return;
    const unsigned char* src = packed + row * stride;
    uint4* dst = reinterpret_cast<uint4*>(out + row * DS4_SA_DIM) + 2 * lane;
    if (lane < 28) {
        const uint2* p = reinterpret_cast<const uint2*>(src + 16 * lane);
        const float scale = ds4_ue8m0(src[DS4_SA_FP8_SCALE_OFF + lane / 4]);
        dst[0] = ds4_dequant8<true>(p[0], scale);
        dst[1] = ds4_dequant8<true>(p[1], scale);
    } else {
        const uint2* p = reinterpret_cast<const uint2*>(src + DS4_SA_FP8_ROPE_OFF + 32 * (lane - 28));
        const uint2 a = p[0], b = p[1], c = p[2], d = p[3];
        dst[0] = make_uint4(a.x, a.y, b.x, b.y);
        dst[1] = make_uint4(c.x, c.y, d.x, d.y);
    }
}
