"""Backward from dense indices: kernel forms side by side with a zero fill of the output
(the write floor), CUDA-graph replay, inputs rotating beyond L2.  Flash routing (E=256, k=6,
sqrtsoftplus, scaling 1.5).  python bench/lab/bwd_idx_probe.py [--tokens 65536] [--l2-fetch 32]
(--l2-fetch: the context's L2 fetch granularity limit for the run; 64 bytes by default on an H100)"""
import argparse

import numpy as np

from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops import router as r
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name

E, K = 256, 6
L2_FETCH_LIMIT = 5  # cudaLimitMaxL2FetchGranularity


def backward_inputs(cp, rng, T, dt):
    """Inputs of the backward from dense indices, enough copies to rotate beyond L2: (copies,
    gradients [T, E] in dt, float32 intermediates, distinct random indices [T, K], outputs)."""
    size = np.dtype(dt).itemsize
    n = max(2, min(16, (256 << 20) // (T * E * (2 * size + 4))))
    gs = [cp.asarray(rng.standard_normal((T, E)).astype(dt)) for _ in range(n)]
    acts = [cp.asarray(rng.standard_normal((T, E)).astype(np.float32)) for _ in range(n)]
    idx = [cp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)) for _ in range(n)]
    outs = [cp.empty((T, E), dt) for _ in range(n)]
    return n, gs, acts, idx, outs


def minimal_bytes(T, size):
    """The k gathered gradients, intermediates and indices, and the written [T, E] gradient."""
    return T * K * (size + 4 + 4) + T * E * size


def zero_fill(cp, out):
    """The output's zero fill alone (the write floor), on the current stream."""
    cp.cuda.runtime.memsetAsync(out.data.ptr, 0, out.nbytes, cp.cuda.get_current_stream().ptr)


def probe_setup(argv=None):
    """The probes' common start: ``--tokens``, their random generator, the copy bandwidth of this
    run, and the header line.  Returns (T, rng, bw)."""
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--l2-fetch", type=int, help="set the context's L2 fetch granularity limit (bytes) first")
    a = ap.parse_args(argv)
    T = a.tokens
    if a.l2_fetch is not None:
        cp.cuda.runtime.deviceSetLimit(L2_FETCH_LIMIT, a.l2_fetch)
    bw = copy_bandwidth()
    print(f"device: {device_name()}; copy {bw / 1e9:.0f} GB/s; T={T} E={E} k={K}; L2 fetch granularity "
          f"{cp.cuda.runtime.deviceGetLimit(L2_FETCH_LIMIT)} bytes")
    return T, np.random.default_rng(1), bw


def main():
    import cupy as cp
    T, rng, bw = probe_setup()
    for dt_name, dt in (("float32", np.float32), ("bfloat16", BFLOAT16)):
        size = np.dtype(dt).itemsize
        n, gs, acts, idx, outs = backward_inputs(cp, rng, T, dt)
        minimal = minimal_bytes(T, size)
        kern = r.ROUTER_KERNELS.kernel

        forms = {
            "zero fill (memset)": lambda j: zero_fill(cp, outs[j % n]),
            "warp per row (naive<.,4>)": lambda j: kern(r.backward_name(dt_name, 4))(
                (T // 4,), (128,), (gs[j % n], acts[j % n], idx[j % n], np.int32(3), np.int32(3), np.int64(K),
                                    np.int64(1), np.int64(T), np.int32(E), np.int32(K), np.int32(2), np.int32(0),
                                    np.float32(1.5), outs[j % n])),
        }
        # the idx kernel's arguments: grad, inter, routing, idx_kind, i_rs, i_cs, T, E, k, sf, scaling, vec, out
        for seg in r.BACKWARD_IDX_SEG:
            per = 32 // seg * 4
            forms[f"{seg} lanes per token"] = lambda j, seg=seg, per=per: kern(r.backward_idx_name(dt_name, seg))(
                ((T + per - 1) // per,), (128,), (gs[j % n], acts[j % n], idx[j % n], np.int32(3), np.int64(K),
                                                  np.int64(1), np.int64(T), np.int32(E), np.int32(K), np.int32(2),
                                                  np.float32(1.5), np.int32(1), outs[j % n]))
        res = {}
        for name, fn in forms.items():
            if name != "zero fill (memset)":
                outs[0].fill(np.nan)
                fn(0)
                res[name] = cp.asnumpy(outs[0]).astype(np.float32)
            t = cuda_graph_time(fn, inner=max(10, n))
            byt = T * E * size if name.startswith("zero") else minimal
            print(f"{dt_name:9s} {name:32s} {t * 1e6:8.2f} us  {100 * byt / t / bw:5.1f}% of copy"
                  f" ({'output bytes' if name.startswith('zero') else 'minimal bytes'})", flush=True)
        vals = list(res.values())
        print("  max |naive - each|:", [float(np.nanmax(np.abs(vals[0] - v))) for v in vals[1:]],
              " NaN left:", [int(np.isnan(v).sum()) for v in vals])


if __name__ == "__main__":
    main()
