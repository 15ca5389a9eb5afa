// Shared pieces of the sparse decode attention kernels (naive.cu, head_batched.cu, split_merge.cu,
// fp8.cu): the FP8 KV row layout and its e4m3 / ue8m0 codes, slot checks, RoPE of the output,
// and the cp.async / ldmatrix / mma.sync wrappers of the tensor-core kernel.
//
// Semantics (one query token n, one head h; s_j = q . kv[idx[n, j]] * scale over the valid slots):
//   m = max_j s_j, l = sum_j exp(s_j - m), o = sum_j exp(s_j - m) kv[idx[n, j]] / (l + exp(sink_h - m))
// Scores are kept in base-2 units (s * scale * log2 e) so exponentials are exp2f; lse is converted
// back to natural units.  No valid slot: o = 0 and lse = -inf.
#pragma once
#include "../common/common.cuh"

#define DS4_SA_DIM 512          // head dim (nope + rope)
#define DS4_SA_NOPE 448         // nope dims; FP8 rows hold them as e4m3
#define DS4_SA_FP8_ROW 584      // bytes of an FP8 row: 448 e4m3, 64 bf16 (128 B), 7 scales, 1 pad
#define DS4_SA_FP8_ROPE_OFF 448 // byte offset of the bf16 rope values in an FP8 row
#define DS4_SA_FP8_SCALE_OFF 576
#define DS4_SA_WARPS 8          // warps of a head_batched / naive block
#define DS4_SA_LOG2E 1.4426950408889634f
#define DS4_SA_LN2 0.6931471805599453f

// 2^x with results below 2^-126 flushed to zero (ex2.approx.ftz, what __expf uses).  exp2f's
// subnormal-preserving form makes ptxas spill registers in loops on sm_90, and a flushed weight
// below 2^-126 is invisible next to the running maximum's weight of 1.
__device__ __forceinline__ float ds4_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------------
// FP8 codes

// ue8m0 scale byte b -> 2^(b - 127); byte 255 is NaN (OCP E8M0).  Byte 0 is 2^-127, a float
// subnormal, so an all-zero (zero-filled) row decodes to zeros.
__device__ __forceinline__ float ds4_ue8m0(unsigned b) {
    if (b == 0u) return __uint_as_float(0x00400000u);
    if (b == 255u) return __uint_as_float(0x7fffffffu);
    return __uint_as_float(b << 23);
}

// e4m3 (fn: bias 7, no inf, 0x7f / 0xff NaN) -> float, exactly.  The 7 magnitude bits placed at
// float bit 20 give the value times 2^-120 (subnormals included), so one multiply restores it.
// Subnormal codes (exponent 0) are taken as m * 2^-9: CuPy compiles with -ftz=true, which would
// flush the subnormal float intermediate of the bit placement to zero.
__device__ __forceinline__ float ds4_e4m3_to_float(unsigned x) {
    const unsigned mag = x & 0x7fu;
    float v = mag >= 8u ? __uint_as_float(mag << 20) * 0x1p120f : (float)mag * 0x1p-9f;
    v = (x & 0x80u) ? -v : v;
    return mag == 0x7fu ? __uint_as_float(0x7fffffffu) : v;
}

// a * b rounded to nearest without flushing subnormal inputs or results (kernels are compiled with
// -ftz=true by CuPy; the FP8 packer must scale subnormal bf16 values exactly).
__device__ __forceinline__ float ds4_mul_keep_subnormals(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// float -> e4m3, round to nearest even; |v| <= 448 after scaling, anything else (NaN, inf) -> 0x7f
// (NaN, unsigned: arithmetic on a NaN does not keep its sign).  The same steps as reference.py's.
__device__ __forceinline__ unsigned ds4_float_to_e4m3(float v) {
    const unsigned s = (__float_as_uint(v) >> 24) & 0x80u;
    const float a = fabsf(v);
    if (!(a <= 448.0f)) return 0x7fu;
    if (a < 0x1p-6f) return s | (unsigned)__float2int_rn(a * 512.0f);  // subnormal grid 2^-9 (8 -> 2^-6)
    const int e = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;      // -6 .. 8
    const int q = __float2int_rn(a * __uint_as_float((unsigned)(130 - e) << 23));  // a * 2^(3-e) in [8, 16]
    return s | (unsigned)(((e + 7) << 3) + q - 8);                       // q = 16 carries into the exponent
}

// Scale exponent k of a 64-value tile: the smallest power of two 2^k with amax <= 448 * 2^k,
// clamped to [-126, 127].  Stored as the byte k + 127.
__device__ __forceinline__ int ds4_tile_exponent(float amax) {
    const unsigned ab = __float_as_uint(amax);
    const int ef = (int)(ab >> 23);
    if (ef == 0) return -126;  // zero or subnormal
    const int e = ef - 127;
    const int k = (ab & 0x7fffffu) <= 0x600000u ? e - 8 : e - 7;  // significand <= 1.75: 448 * 2^(e-8) covers it
    return k < -126 ? -126 : k;
}

// float -> bf16 bits, round to nearest even, by integer arithmetic: subnormal floats keep their
// value (the hardware conversion may flush them under -ftz); NaN -> the quiet NaN 0x7fc0 with its sign.
__device__ __forceinline__ unsigned ds4_bf16_bits(float f) {
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// One e4m3 code times its tile scale -> bf16 bits, exactly as reference.py: subnormals kept, and a
// NaN code (0x7f / 0xff) gives the quiet NaN with the code's sign (a multiply would drop the sign).
__device__ __forceinline__ unsigned ds4_e4m3_scaled_bf16_bits(unsigned code, float scale) {
    if ((code & 0x7fu) == 0x7fu) return ((code & 0x80u) << 8) | 0x7fc0u;
    return ds4_bf16_bits(ds4_mul_keep_subnormals(ds4_e4m3_to_float(code), scale));
}

// 8 e4m3 bytes (w.x low bytes first) times one scale -> 8 bf16 (as a uint4).  EXACT: products and
// conversions keep subnormal results (the unpacker's contract); else the faster hardware
// conversion (attention, where a subnormal key value's contribution is below rounding anyway).
template <bool EXACT = false>
__device__ __forceinline__ uint4 ds4_dequant8(uint2 w, float scale) {
    unsigned r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned word = i < 2 ? w.x : w.y;
        const int sh = (i & 1) * 16;
        const unsigned ca = (word >> sh) & 0xffu, cb = (word >> (sh + 8)) & 0xffu;
        if (EXACT) {
            r[i] = ds4_e4m3_scaled_bf16_bits(ca, scale) | (ds4_e4m3_scaled_bf16_bits(cb, scale) << 16);
        } else {
            const float a = ds4_mul_keep_subnormals(ds4_e4m3_to_float(ca), scale);
            const float b = ds4_mul_keep_subnormals(ds4_e4m3_to_float(cb), scale);
            __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
            r[i] = *reinterpret_cast<unsigned*>(&p);
        }
    }
    return make_uint4(r[0], r[1], r[2], r[3]);
}

// ---------------------------------------------------------------------------------------------
// Slots, positions, RoPE

// A slot is read only if 0 <= slot < pool_rows; -1 is "no slot"; anything else is counted.
__device__ __forceinline__ bool ds4_slot_ok(int slot, long long pool_rows) {
    return slot >= 0 && (long long)slot < pool_rows;
}
__device__ __forceinline__ bool ds4_slot_bad(int slot, long long pool_rows) {
    return slot < -1 || (long long)slot >= pool_rows;
}

__device__ __forceinline__ long long ds4_sa_position(const void* positions, int pos64, long long n) {
    return pos64 ? static_cast<const long long*>(positions)[n] : (long long)static_cast<const int*>(positions)[n];
}

// Inverse (conjugate) rotation of the interleaved pair (2i, 2i+1) of the rope dims: the forward
// rotation is y0 = x0 c - x1 s, y1 = x0 s + x1 c; this undoes it.  Out-of-range positions give NaN.
__device__ __forceinline__ void ds4_inverse_rope(float& x0, float& x1, const float* cos_t, const float* sin_t,
                                                 long long pos, long long max_pos, int pair) {
    if (pos < 0 || pos >= max_pos) {
        x0 = x1 = __uint_as_float(0x7fffffffu);
        return;
    }
    const float c = cos_t[pos * 32 + pair], s = sin_t[pos * 32 + pair];
    const float y0 = __fmaf_rn(x0, c, x1 * s);
    const float y1 = __fmaf_rn(x1, c, -(x0 * s));
    x0 = y0;
    x1 = y1;
}

// Final normalisation shared by every variant: 1 / (l + exp(sink - m)) in base-2 units; a head with
// no valid slot (l == 0) gives 0 (never 0 / 0); a NaN l stays NaN.
__device__ __forceinline__ float ds4_sa_inv_denominator(float l, float m2, float sink) {
    if (l == 0.0f) return 0.0f;
    return 1.0f / (l + ds4_exp2(__fmaf_rn(sink, DS4_SA_LOG2E, -m2)));
}
__device__ __forceinline__ float ds4_sa_lse(float l, float m2) {
    if (l == 0.0f) return DS4_NEG_INF;
    return (m2 + log2f(l)) * DS4_SA_LN2;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core and async-copy wrappers (sm_80+)

__device__ __forceinline__ unsigned ds4_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; bytes < 16 zero-fills the rest (0: no global read at all).
__device__ __forceinline__ void ds4_cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ds4_smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void ds4_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void ds4_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// ldmatrix from a 32-bit shared-memory address (cheaper to keep in registers than a generic pointer).
__device__ __forceinline__ void ds4_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ds4_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a (16x16 bf16, row) * b (16x8 bf16, col), float32 accumulators.
__device__ __forceinline__ void ds4_mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned ds4_pack_bf16x2(float a, float b) {
    __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&p);
}
