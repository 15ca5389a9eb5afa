// topk_rows, sort variant: one block per row sorts the whole row (C <= 8192) in shared memory as
// 64-bit words (key << 32 | ~column, 0 beyond the row's length), bitonic, descending, and writes
// the first k columns (-1 beyond the valid ones).  The reference's GPU twin.
#include "topk_common.cuh"

// n2: a power of two >= C (dynamic shared memory n2 * 8 bytes).  Grid: one block per row.
template <typename T>
__global__ void __launch_bounds__(DS4_TOPK_THREADS)
topk_sort_rows(const T* __restrict__ scores, long long row_stride, int cols, const int* __restrict__ lengths,
               int n2, int k, int* __restrict__ out, int* __restrict__ errors) {
    extern __shared__ __align__(16) unsigned long long ds4_topk_words[];
    const long long row = blockIdx.x;
    int len = cols;
    if (lengths != nullptr) {
        len = lengths[row];
        if (len < 0 || len > cols) {
            if (errors != nullptr && threadIdx.x == 0) atomicAdd(errors, 1);
            len = min(max(len, 0), cols);
        }
    }
    const T* src = scores + row * row_stride;
    for (int i = threadIdx.x; i < n2; i += DS4_TOPK_THREADS)
        ds4_topk_words[i] = i < len ? ds4_topk_word(ds4_topk_order(ds4_topk_float(src[i])), (unsigned)i) : 0ull;
    __syncthreads();
    if (n2 > 1) ds4_topk_bitonic_desc(ds4_topk_words, n2);
    const int kk = len < k ? len : k;
    for (int j = threadIdx.x; j < k; j += DS4_TOPK_THREADS)
        out[row * k + j] = j < kk ? (int)ds4_topk_word_pos(ds4_topk_words[j]) : -1;
}
