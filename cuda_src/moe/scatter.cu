// moe_permute's rows: x_perm[slot[t, j]] = x[t] for every entry (t, j) with a slot.  The copy is
// by token, not by permuted row, so each row of x is read once however many experts it goes to.
//
// U is the copy unit: uint4 (16 bytes; rows, row strides and base addresses 16-byte aligned) or
// the element's own size (unsigned int / unsigned short, any layout).  The kernel never looks at
// the values, so one instantiation serves every dtype of that size.
//
// Thread layout: one block of DS4_MOE_SCATTER_THREADS threads per token; a thread loads one
// unit of the row and stores it to each of the token's slots, then moves on by the block size.
// Slots outside [0, rows) (a hand-made permutation) are not written.
//
// Bytes per token: D * itemsize read, (valid entries) * D * itemsize written, 4 k of slots.
#include "../common/common.cuh"

#define DS4_MOE_SCATTER_THREADS 128

template <typename U>
__global__ void __launch_bounds__(DS4_MOE_SCATTER_THREADS)
moe_scatter_rows(const U* __restrict__ x, long long x_rs, int units, const int* __restrict__ slot, int k,
                 U* __restrict__ x_perm, long long p_rs, long long rows) {
    const long long t = blockIdx.x;
    const int* s = slot + t * k;
    for (int u = threadIdx.x; u < units; u += DS4_MOE_SCATTER_THREADS) {
        const U v = __ldg(x + t * x_rs + u);
        for (int j = 0; j < k; ++j) {
            const int p = __ldg(s + j);
            if (p >= 0 && p < rows) x_perm[(long long)p * p_rs + u] = v;
        }
    }
}
