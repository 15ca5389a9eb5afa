// router_hash_naive<T> — hash routing (DeepSeek-V4 layers 0-2), compact form.
//
// Bytes moved: T*k*sizeof(T) gathered from logits, T*(4 or 8) token ids, the used table rows,
// T*k*(4 + sizeof(index)) written.
#include "../common/common.cuh"
#include "../router/router_common.cuh"

// router_hash_naive<T>: hash-routed layers (DeepSeek-V4 layers 0-2).  One warp per token; lane j
// handles the j-th table entry: e = tid2eid[token_ids[t], j], weight from the score of logit e,
// normalised over the k entries.  Only k logits per token are read (gathers).
// Out-of-range token ids or table entries are never dereferenced: the entry gets index 0 and a
// NaN score (so its row's weights are NaN), and *errors (if given) counts it.
template <typename T>
__global__ void router_hash_naive(const T* __restrict__ logits, const int* __restrict__ tid2eid,
                                  long long vocab, const void* __restrict__ token_ids, int tok64,
                                  long long num_tokens, int E, int k, int score_fn, float scaling,
                                  float* __restrict__ weights, long long w_rs, long long w_cs,
                                  void* __restrict__ indices, long long i_rs, long long i_cs,
                                  int idx_kind, int* __restrict__ errors) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (token >= num_tokens) return;
    const long long tid = tok64 ? static_cast<const long long*>(token_ids)[token]
                                : (long long)static_cast<const int*>(token_ids)[token];
    const bool tok_ok = tid >= 0 && tid < vocab;
    float* wrow = weights + token * w_rs;
    float part = 0.0f;
    for (int j = lane; j < k; j += 32) {
        const int e = tok_ok ? tid2eid[tid * k + j] : -1;
        const bool ok = e >= 0 && e < E;
        float v = __int_as_float(0x7fffffff);  // NaN
        if (ok) v = ds4_score_fn(ds4_to_float(logits[token * (long long)E + e]), score_fn);
        else if (errors != nullptr) atomicAdd(errors, 1);
        ds4_store_index(indices, idx_kind, token * i_rs + j * i_cs, ok ? e : 0);
        wrow[j * w_cs] = v;
        part += v;
    }
    const float total = ds4_warp_sum(part);
    for (int j = lane; j < k; j += 32) {
        const float v = wrow[j * w_cs];
        wrow[j * w_cs] = (k > 1 ? v / (total + 1e-20f) : v) * scaling;
    }
}
