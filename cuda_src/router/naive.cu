// router_topk_naive<T, VPL> — DeepSeek-V4 router top-k (compact form): weights [T, k] float32,
// indices [T, k].
//
// One warp per token.  Lane l holds experts l, l+32, ... (VPL = values per lane, a compile-time
// bound with 32*VPL >= E) as 32-bit order keys in registers.  k rounds: each lane takes its best
// key, the warp takes the max key (__reduce_max_sync) and then the lowest expert index holding it
// (__reduce_min_sync): larger score first, lower index on ties.  The owner clears the winner's
// key.  Weights are computed after selection from the logits of the chosen experts (a cached
// re-read of k values), so the unbiased score and the normalisation need no extra registers.
// Group-limited routing (num_groups > 0) masks the keys of the dropped groups first.
//
// Outputs may be strided views (row and column strides in elements), and the index type is a
// run-time switch (uint8/uint16/int16/int32/int64) so a routing-capture buffer of a narrow dtype
// is filled in place with no extra kernel.
//
// Bytes moved: T*E*sizeof(T) read (+E*4 bias, cached), T*k*(4 + sizeof(index)) written.
// Needs sm_80+ for the warp-reduce instructions.
#include "../common/common.cuh"
#include "router_common.cuh"
#include "rounds.cuh"

template <typename T, int VPL>
__global__ void router_topk_naive(const T* __restrict__ logits,
                                  const float* __restrict__ bias,  // [E] or nullptr
                                  long long num_tokens, int E, int k,
                                  int score_fn, int pre_softmax, float scaling,
                                  float* __restrict__ weights, long long w_rs, long long w_cs,
                                  void* __restrict__ indices, long long i_rs, long long i_cs,
                                  int idx_kind, int num_groups, int group_topk) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (token >= num_tokens) return;  // whole warps leave together
    const T* row = logits + token * (long long)E;
    const bool pre = score_fn == DS4_SCORE_SOFTMAX && pre_softmax;
    float x[VPL], mx, denom;
    ds4_load_row<T, VPL>(row, lane, E, pre, x, mx, denom);
    ds4_topk_rounds<T, VPL>(row, bias, x, lane, E, k, score_fn, pre, mx, denom, scaling,
                            weights + token * w_rs, w_cs, indices, token * i_rs, i_cs, idx_kind,
                            num_groups, group_topk);
}
