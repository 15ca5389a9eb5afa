// The TE router's backward: grad_logits of the dense form (and of the aux-loss scores, map kind
// DS4_MAP_ALL), from the forward's float32 intermediate and its routing map or dense indices.
//
// router_topk_backward_naive<T, V>: one warp per token, V experts per lane at a time, every row
// read twice (sums, then the gradient).  router_topk_backward_idx<T, SEG>: from dense indices
// only, SEG lanes per token, the k selected entries gathered and the rest of each row zero-filled.
// Both kernels' comments give their bytes; the formulas are shared (bwd_accumulate / bwd_value).
#include "../common/common.cuh"
#include "../router/router_common.cuh"
#include "te_common.cuh"

// router_topk_backward_naive<T, V>: grad_logits of the dense form.  One warp per token; each lane
// takes V consecutive experts at a time (V = 4: vector loads/stores, needs E % 4 == 0 and aligned
// rows; V = 1 otherwise) and strides over the row twice (sums over the selected set, then the
// gradient; the second pass re-reads from cache).  routing: bytemap, bitmap, or dense indices
// (map_kind 3: only the k selected entries are gathered and the rest of the row is zero-filled,
// except for softmax pre, whose gradient reaches every expert; entries outside [0, E) select
// nothing; the host uses router_topk_backward_idx below unless softmax pre).  g = grad * scaling; act = the
// forward's intermediate:
//   softmax:  dot = sum_R g*act; pre: act*(g_R - dot) on every e; post: act*(g - dot) on R.
//   sigmoid / sqrtsoftplus: s = act or sqrt(softplus(act)); k > 1: S = sum_R s + eps,
//     D = sum_R g*s, gs = g/S - D/S^2 on R; k = 1: gs = g on R; then * s(1-s), or
//     * sigmoid(x)/(2s + eps) (x > 20: 1/(2s + eps)) for sqrtsoftplus.
// Bytes: map: T*E*(2*sizeof(T) + 4 + map); indices: T*k*(sizeof(T) + 4 + idx) + T*E*sizeof(T).
struct BwdCtx {
    int score_fn, k;
    bool softmax, pre;
    float scaling, s1, s2;  // s1: dot (softmax) or S - eps; s2: D
};

__device__ __forceinline__ void bwd_accumulate(const BwdCtx& c, float g, float a, float& s1, float& s2) {
    if (c.softmax) {
        s1 += g * a;
    } else {
        const float s = c.score_fn == DS4_SCORE_SIGMOID ? a : ds4_score_fn(a, DS4_SCORE_SQRTSOFTPLUS);
        s1 += s;
        s2 += g * s;
    }
}

// gradient of one expert; g is already scaled and zero when not selected
__device__ __forceinline__ float bwd_value(const BwdCtx& c, float g, float a, bool sel) {
    const float eps = 1e-20f;
    if (c.softmax) return (c.pre || sel) ? a * (g - c.s1) : 0.0f;
    if (!sel) return 0.0f;
    const float s = c.score_fn == DS4_SCORE_SIGMOID ? a : ds4_score_fn(a, DS4_SCORE_SQRTSOFTPLUS);
    const float S = c.s1 + eps;
    const float gs = c.k > 1 ? g / S - c.s2 / (S * S) : g;
    if (c.score_fn == DS4_SCORE_SIGMOID) return gs * s * (1.0f - s);
    return gs * ((a > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-a))) / (2.0f * s + eps));
}

template <typename T, int V>
struct BwdVec;
template <typename T>
struct BwdVec<T, 1> {
    static __device__ __forceinline__ void load(const T* g, const float* a, float (&gv)[1], float (&av)[1]) {
        gv[0] = ds4_to_float(*g);
        av[0] = *a;
    }
    static __device__ __forceinline__ void store(T* o, const float (&v)[1]) { *o = ds4_from_float<T>(v[0]); }
};
template <typename T>
struct BwdVec<T, 4> {
    static __device__ __forceinline__ void load(const T* g, const float* a, float (&gv)[4], float (&av)[4]) {
        if constexpr (sizeof(T) == 4) {
            const float4 x = *reinterpret_cast<const float4*>(g);
            gv[0] = x.x; gv[1] = x.y; gv[2] = x.z; gv[3] = x.w;
        } else {
            const uint2 u = *reinterpret_cast<const uint2*>(g);
            const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
            for (int i = 0; i < 4; ++i) gv[i] = ds4_to_float(h[i]);
        }
        const float4 y = *reinterpret_cast<const float4*>(a);
        av[0] = y.x; av[1] = y.y; av[2] = y.z; av[3] = y.w;
    }
    static __device__ __forceinline__ void store(T* o, const float (&v)[4]) {
        if constexpr (sizeof(T) == 4) {
            *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            uint2 u;
            T* h = reinterpret_cast<T*>(&u);
#pragma unroll
            for (int i = 0; i < 4; ++i) h[i] = ds4_from_float<T>(v[i]);
            *reinterpret_cast<uint2*>(o) = u;
        }
    }
};

// selection bits of experts e .. e + V - 1 (bit i: expert e + i)
template <int V>
__device__ __forceinline__ unsigned bwd_sel(const unsigned char* __restrict__ m, int map_kind, int e) {
    if (map_kind == DS4_MAP_ALL) return (1u << V) - 1u;
    if (map_kind == DS4_MAP_BITS) return (m[e >> 3] >> (e & 7)) & ((1u << V) - 1u);
    if (V == 4) {
        const uchar4 b = *reinterpret_cast<const uchar4*>(m + e);
        return (b.x != 0) | ((b.y != 0) << 1) | ((b.z != 0) << 2) | ((b.w != 0) << 3);
    }
    return m[e] != 0;
}

template <typename T, int V>
__global__ void router_topk_backward_naive(const T* __restrict__ grad, const float* __restrict__ inter,
                                           const void* __restrict__ routing, int map_kind, int idx_kind,
                                           long long i_rs, long long i_cs, long long num_tokens, int E, int k,
                                           int score_fn, int pre_softmax, float scaling, T* __restrict__ grad_logits) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * DS4_DENSE_WARPS + (threadIdx.x >> 5);
    if (token >= num_tokens) return;
    const T* grow = grad + token * (long long)E;
    const float* arow = inter + token * (long long)E;
    T* orow = grad_logits + token * (long long)E;
    BwdCtx c;
    c.score_fn = score_fn;
    c.k = k;
    c.softmax = score_fn == DS4_SCORE_SOFTMAX;
    c.pre = c.softmax && pre_softmax;
    c.scaling = scaling;
    float s1 = 0.0f, s2 = 0.0f;
    if (map_kind == DS4_MAP_INDICES) {
        const long long irow = token * i_rs;
        // the unselected entries: zero (written first, overlapping the gathers' latency), or
        // -act*dot for softmax pre (after the sums)
        if (!c.pre) {
            const float zero[V] = {};
            for (int e = V * lane; e < E; e += 32 * V) BwdVec<T, V>::store(orow + e, zero);
        }
        for (int j = lane; j < k; j += 32) {
            const int e = ds4_load_index(routing, idx_kind, irow + j * i_cs);
            if ((unsigned)e < (unsigned)E) bwd_accumulate(c, ds4_to_float(grow[e]) * scaling, arow[e], s1, s2);
        }
        c.s1 = ds4_warp_sum(s1);
        c.s2 = ds4_warp_sum(s2);
        if (c.pre) {
            for (int e = V * lane; e < E; e += 32 * V) {
                float gv[V], av[V], out[V];
                BwdVec<T, V>::load(grow + e, arow + e, gv, av);
#pragma unroll
                for (int i = 0; i < V; ++i) out[i] = av[i] * (0.0f - c.s1);
                BwdVec<T, V>::store(orow + e, out);
            }
        }
        __syncwarp();
        for (int j = lane; j < k; j += 32) {
            const int e = ds4_load_index(routing, idx_kind, irow + j * i_cs);
            if ((unsigned)e < (unsigned)E)
                orow[e] = ds4_from_float<T>(bwd_value(c, ds4_to_float(grow[e]) * scaling, arow[e], true));
        }
        return;
    }
    const unsigned char* m = map_kind == DS4_MAP_ALL ? nullptr
                             : static_cast<const unsigned char*>(routing) +
                                   token * (long long)(map_kind == DS4_MAP_BITS ? (E + 7) >> 3 : E);
    for (int e = V * lane; e < E; e += 32 * V) {
        float gv[V], av[V];
        BwdVec<T, V>::load(grow + e, arow + e, gv, av);
        const unsigned sel = bwd_sel<V>(m, map_kind, e);
#pragma unroll
        for (int i = 0; i < V; ++i)
            if ((sel >> i) & 1u) bwd_accumulate(c, gv[i] * scaling, av[i], s1, s2);
    }
    c.s1 = ds4_warp_sum(s1);
    c.s2 = ds4_warp_sum(s2);
    for (int e = V * lane; e < E; e += 32 * V) {
        float gv[V], av[V], out[V];
        BwdVec<T, V>::load(grow + e, arow + e, gv, av);
        const unsigned sel = bwd_sel<V>(m, map_kind, e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const bool on = (sel >> i) & 1u;
            out[i] = bwd_value(c, on ? gv[i] * scaling : 0.0f, av[i], on);
        }
        BwdVec<T, V>::store(orow + e, out);
    }
}

// router_topk_backward_idx<T, SEG>: grad_logits from dense indices, every score function except
// softmax pre (whose gradient reaches every expert: the kernel above).  A segment of SEG lanes per
// token (host: 16 for 16-bit gradients and k <= 16, else 32), so a warp has 32 / SEG rows in
// flight: each lane gathers entry j = its segment lane (+ SEG ...), the warp zero-fills its rows
// (one contiguous span; 16-byte stores when `vec`: E * sizeof(T) % 16 == 0 and an aligned base),
// the sums go through log2(SEG) shuffles inside the segment, and each lane writes its entries over
// the zeros (__syncwarp orders the two within the warp).  Index entries outside [0, E) select nothing.  Same formulas as
// bwd_accumulate / bwd_value.  Bytes: T*k*(sizeof(T) + 4 + idx) + T*E*sizeof(T).
// (__launch_bounds__ with 4 blocks per SM: without a minimum, ptxas for sm_80 settled on 32
// registers for the 16-bit forms and spilled.)
template <typename T, int SEG>
__global__ void __launch_bounds__(32 * DS4_DENSE_WARPS, 4)
router_topk_backward_idx(const T* __restrict__ grad, const float* __restrict__ inter, const void* __restrict__ routing,
                         int idx_kind, long long i_rs, long long i_cs, long long num_tokens, int E, int k,
                         int score_fn, float scaling, int vec, T* __restrict__ grad_logits) {
    constexpr int R = 32 / SEG;  // rows per warp
    const int lane = threadIdx.x & 31;
    const long long t0 = ((long long)blockIdx.x * DS4_DENSE_WARPS + (threadIdx.x >> 5)) * R;
    if (t0 >= num_tokens) return;
    const int nr = (int)min((long long)R, num_tokens - t0);
    const int sl = lane % SEG;
    const long long token = t0 + lane / SEG;
    const bool live = lane / SEG < nr;
    const T* grow = grad + token * (long long)E;
    const float* arow = inter + token * (long long)E;
    // this lane's first entry, gathered before the zero fill is issued (the fill's stores overlap
    // the loads' latency; gathering after the fill measured 1-8% slower)
    int e0 = live && sl < k ? ds4_load_index(routing, idx_kind, token * i_rs + sl * i_cs) : -1;
    e0 = (unsigned)e0 < (unsigned)E ? e0 : -1;
    float g0 = 0.0f, a0 = 0.0f;
    if (e0 >= 0) {
        g0 = ds4_to_float(grow[e0]) * scaling;
        a0 = arow[e0];
    }
    {
        T* span = grad_logits + t0 * (long long)E;
        const int n = nr * E;
        int head = 0;
        if (vec) {
            constexpr int PER = 16 / (int)sizeof(T);
            uint4* q = reinterpret_cast<uint4*>(span);
            const int nv = n / PER;
            for (int i = lane; i < nv; i += 32) q[i] = make_uint4(0u, 0u, 0u, 0u);
            head = nv * PER;
        }
        const T zero = ds4_from_float<T>(0.0f);
        for (int i = head + lane; i < n; i += 32) span[i] = zero;
    }
    BwdCtx c;
    c.score_fn = score_fn;
    c.k = k;
    c.softmax = score_fn == DS4_SCORE_SOFTMAX;
    c.pre = false;
    c.scaling = scaling;
    float s1 = 0.0f, s2 = 0.0f;
    if (e0 >= 0) bwd_accumulate(c, g0, a0, s1, s2);
    if (live) {
        for (int j = sl + SEG; j < k; j += SEG) {  // k > SEG
            const int e = ds4_load_index(routing, idx_kind, token * i_rs + j * i_cs);
            if ((unsigned)e < (unsigned)E) bwd_accumulate(c, ds4_to_float(grow[e]) * scaling, arow[e], s1, s2);
        }
    }
#pragma unroll
    for (int off = SEG / 2; off > 0; off >>= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
        s2 += __shfl_xor_sync(0xffffffffu, s2, off);
    }
    c.s1 = s1;
    c.s2 = s2;
    __syncwarp();
    if (!live) return;
    T* orow = grad_logits + token * (long long)E;
    if (e0 >= 0) orow[e0] = ds4_from_float<T>(bwd_value(c, g0, a0, true));
    for (int j = sl + SEG; j < k; j += SEG) {  // k > SEG: the rest, read again (cached)
        const int e = ds4_load_index(routing, idx_kind, token * i_rs + j * i_cs);
        if ((unsigned)e < (unsigned)E)
            orow[e] = ds4_from_float<T>(bwd_value(c, ds4_to_float(grow[e]) * scaling, arow[e], true));
    }
}
