// router_topk_rows_grouped<T, SF> — the rows router top-k (rows_common.cuh) with group-limited
// routing: two lanes per token (LPT 2), a list of KMAX = 8, num_groups groups of E / num_groups
// experts (a multiple of 16: each lane holds whole chunks of every group), m = k / group_topk <= 2.
//
// Step 1 also gathers each group's screened score; the top group_topk groups by those are kept
// when they are clearly apart, else the close groups' scores are computed exactly
// (ds4_rows_exact_groups); tau and the live chunks then come from the kept groups' chunks only.
// The steps are the GROUPED branches of ds4_rows_tile (rows_tile.cuh), whose comment details them.
//
// Thread layout: as router_topk_rows (rows_common.cuh).  Bytes: the same, plus a second read of a
// row's chunks (from L1 / L2) for the rare rows whose group choice is computed exactly.
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rows_common.cuh"
#include "rows_tile.cuh"

// Group-limited form: two lanes per token, k <= 8 (the host checks the group shapes above).
template <typename T, int SF>
__global__ void __launch_bounds__(32 * DS4_ROWS_WARPS, DS4_ROWS_MINB)
router_topk_rows_grouped(const T* __restrict__ logits, const float* __restrict__ bias, long long num_tokens, int E,
                         int k, float scaling, float* __restrict__ weights, long long w_rs, long long w_cs,
                         void* __restrict__ indices, long long i_rs, long long i_cs, int idx_kind, int num_groups,
                         int group_topk) {
    ds4_rows_topk<T, SF, 8, 2, true>(logits, bias, num_tokens, E, k, scaling, weights, w_rs, w_cs, indices, i_rs,
                                     i_cs, idx_kind, num_groups, group_topk);
}
