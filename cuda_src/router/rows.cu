// router_topk_rows<T, SF, KMAX, LPT> — router top-k (compact form: weights [T, k] float32,
// indices [T, k]), one thread per token (LPT = 1) or two (LPT = 2): sigmoid or sqrtsoftplus
// (+ bias), no group-limited routing, E % 8 == 0, E <= 256, k <= KMAX, rows 16-byte aligned.
// Algorithm, thread layout and bytes: rows_common.cuh.
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rows_common.cuh"
#include "rows_tile.cuh"

template <typename T, int SF, int KMAX, int LPT>
__global__ void __launch_bounds__(32 * DS4_ROWS_WARPS, DS4_ROWS_MINB)
router_topk_rows(const T* __restrict__ logits, const float* __restrict__ bias, long long num_tokens, int E, int k,
                 float scaling, float* __restrict__ weights, long long w_rs, long long w_cs,
                 void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind) {
    ds4_rows_topk<T, SF, KMAX, LPT, false>(logits, bias, num_tokens, E, k, scaling, weights, w_rs, w_cs, indices,
                                           i_rs, i_cs, idx_kind, 0, 0);
}
