"""router_topk as a composite of CuPy array functions (a ds4kern plugin, and a benchmark peer).

Same semantics as ds4kern's own variants, including the tie rule: selection uses a 64-bit key
(order-preserving bits of the float32 score, then the inverted expert index), so equal scores go
to the lower index and NaN ranks below every number.
"""

import ds4kern


def _order_keys(xp, s):
    s = xp.where(s == 0, xp.float32(0), s)
    u = s.view(xp.uint32)
    key = xp.where(u & xp.uint32(0x80000000), ~u, u | xp.uint32(0x80000000))
    return xp.where(xp.isnan(s), xp.uint32(1), key).astype(xp.uint32)


def _router_topk(a):
    import cupy as cp

    x = a.logits.astype(cp.float32)
    T, E = x.shape
    k = a.topk
    if a.score_function == "softmax":
        if a.use_pre_softmax:
            e = cp.exp(x - x.max(axis=1, keepdims=True))
            s = e / e.sum(axis=1, keepdims=True)
            sel = s
        else:
            s = sel = x
    elif a.score_function == "sigmoid":
        s = 1 / (1 + cp.exp(-x))
        sel = s if a.expert_bias is None else s + a.expert_bias
    else:
        s = cp.sqrt(cp.where(x > 20, x, cp.log1p(cp.exp(x))))
        sel = s if a.expert_bias is None else s + a.expert_bias
    comb = (_order_keys(cp, sel.astype(cp.float32)).astype(cp.uint64) << cp.uint64(32)) | (
        cp.uint64(0xFFFFFFFF) - cp.arange(E, dtype=cp.uint64))
    idx = cp.argsort(comb, axis=1)[:, ::-1][:, :k]  # the combined keys are unique
    if a.score_function == "softmax" and not a.use_pre_softmax:
        xs = cp.take_along_axis(x, idx, axis=1)
        v = cp.exp(xs - xs[:, :1])
        w = v / v.sum(axis=1, keepdims=True)
    else:
        w = cp.take_along_axis(s, idx, axis=1)
        if a.score_function != "softmax" and k > 1:
            w = w / (w.sum(axis=1, keepdims=True) + cp.float32(1e-20))
    a.weights[...] = w * cp.float32(a.scaling_factor)
    a.indices[...] = idx


@ds4kern.hookimpl
def ds4kern_register_variants(register):
    register(ds4kern.Variant(
        op="router_topk",
        name="cupy_composite",
        backend="cuda",
        fn=_router_topk,
        supports=lambda p: "group-limited routing is not implemented" if getattr(p, "num_groups", 0) else None,
        cost=100.0,  # never preferred over a fused kernel unless asked for
        description="CuPy array functions only (argsort of a 64-bit key); a benchmark peer",
    ))
