// Shared pieces of the lightning indexer's logits kernels (naive.cu, mma.cu): the fixed shapes,
// where a key column lives (contiguous or paged keys), lengths and the error rule, e4m3 decoding,
// and the cp.async / ldmatrix / mma.sync wrappers of the tensor-core kernel.
//
// Semantics (token t, its sequence b = per_token ? t : 0, key column c < lengths[t]):
//   logits[t, c] = sum_h w[t, h] * relu(scale_c * (q[t, h] . key_b[c]))     (scale_c = 1 for bf16 keys)
// Lengths are clamped to [0, C]; a length outside it adds 1 to *errors (once per token).  Paged
// keys: column c of sequence b is row c % 64 of page block_table[b, c / 64]; an entry outside
// [0, pages) makes the 64 columns of that page -inf and adds 1 to *errors once per (token, page)
// with page index j < ceil(lengths[t] / 64) (entries beyond a token's length are never read).
#pragma once
#include "../common/common.cuh"

#define DS4_IX_HEADS 64          // index heads
#define DS4_IX_DIM 128           // index head dim
#define DS4_IX_PAGE 64           // rows of a key page
#define DS4_IX_TILE 64           // key columns of an mma tile (one page)
#define DS4_IX_NAIVE_THREADS 256 // naive: one thread per column
#define DS4_IX_MMA_WARPS 4       // mma: warp w holds heads 16w .. 16w + 15
#define DS4_IX_MMA_THREADS 128

// relu that keeps NaN (fmaxf(NaN, 0) would return 0 and hide it).
__device__ __forceinline__ float ds4_ix_relu(float x) { return x < 0.0f ? 0.0f : x; }

// Clamped length of token t; `bad` tells whether it was outside [0, C].
__device__ __forceinline__ int ds4_ix_length(const int* lengths, long long t, int C, bool& bad) {
    const int n = lengths[t];
    bad = n < 0 || n > C;
    return n < 0 ? 0 : (n > C ? C : n);
}

// Global key row (rows of 128 values; key_scales share the index) of the first column of the
// 64-column block j of sequence b, or -1 when its page is bad.  Contiguous keys [B, C, 128]:
// b * C + 64 j.  Paged keys [pages, 64, 128]: block_table[b, j] * 64.
__device__ __forceinline__ long long ds4_ix_block_row(int b, int j, int C, const int* block_table, int max_pages,
                                                     long long pages) {
    if (block_table == nullptr) return (long long)b * C + (long long)j * DS4_IX_PAGE;
    const int page = block_table[(long long)b * max_pages + j];
    if (page < 0 || (long long)page >= pages) return -1;
    return (long long)page * DS4_IX_PAGE;
}

// e4m3 (fn: bias 7, no inf, 0x7f / 0xff NaN) -> float, exactly.  Normal codes: the 7 magnitude bits
// placed at float bit 20 are a normal float times 2^-120, one multiply restores it.  Subnormal
// codes (exponent 0) as m * 2^-9: CuPy compiles every kernel with -ftz=true, which would flush a
// subnormal float intermediate to zero.
__device__ __forceinline__ float ds4_ix_e4m3(unsigned x) {
    const unsigned mag = x & 0x7fu;
    float v = mag >= 8u ? __uint_as_float(mag << 20) * 0x1p120f : (float)mag * 0x1p-9f;
    v = (x & 0x80u) ? -v : v;
    return mag == 0x7fu ? __uint_as_float(0x7fffffffu) : v;
}

// Four e4m3 bytes (low byte first) -> two bf16x2 words (bytes 0, 1 and 2, 3), exactly.  The same
// bit placement as above in bf16 (8 exponent bits like float) gives value * 2^-120 and a bf16x2
// multiply by 2^120 restores it for normal codes; subnormal codes (a subnormal intermediate) and
// NaN codes take a rare slow path through ds4_ix_e4m3.
__device__ __forceinline__ void ds4_ix_e4m3x4_to_bf16(unsigned x, unsigned& lo, unsigned& hi) {
    const unsigned u0 = __byte_perm(x, 0u, 0x4140), u1 = __byte_perm(x, 0u, 0x4342);  // b0 | b1 << 16, b2 | b3 << 16
    const unsigned p0 = ((u0 & 0x007f007fu) << 4) | ((u0 & 0x00800080u) << 8);
    const unsigned p1 = ((u1 & 0x007f007fu) << 4) | ((u1 & 0x00800080u) << 8);
    const __nv_bfloat162 k = __floats2bfloat162_rn(0x1p120f, 0x1p120f);
    __nv_bfloat162 a = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&p0), k);
    __nv_bfloat162 b = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&p1), k);
    lo = *reinterpret_cast<unsigned*>(&a);
    hi = *reinterpret_cast<unsigned*>(&b);
    const unsigned nan = ((x & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;   // bit 7 of each 0x7f / 0xff byte
    const unsigned has_exp = ((x & 0x78787878u) + 0x78787878u) & 0x80808080u;  // exponent field != 0
    const unsigned has_man = (((x & 0x07070707u) + 0x07070707u) & 0x08080808u) << 4;  // mantissa != 0
    const unsigned slow = nan | (has_man & ~has_exp);
    if (slow != 0u) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (!(slow & (0x80u << (8 * i)))) continue;
            const unsigned short h = __bfloat16_as_ushort(__float2bfloat16_rn(ds4_ix_e4m3((x >> (8 * i)) & 0xffu)));
            unsigned& w = i < 2 ? lo : hi;
            const int sh = (i & 1) * 16;
            w = (w & ~(0xffffu << sh)) | ((unsigned)h << sh);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core and async-copy wrappers (sm_80+)

__device__ __forceinline__ unsigned ds4_ix_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; bytes < 16 zero-fills the rest (0: no global read at all).
__device__ __forceinline__ void ds4_ix_cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ds4_ix_smem_addr(dst)), "l"(src),
                 "r"(bytes));
}
__device__ __forceinline__ void ds4_ix_cp_async4(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(ds4_ix_smem_addr(dst)), "l"(src),
                 "r"(bytes));
}
__device__ __forceinline__ void ds4_ix_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void ds4_ix_cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ds4_ix_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a (16x16 bf16, row) * b (16x8 bf16, col), float32 accumulators.
__device__ __forceinline__ void ds4_ix_mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
