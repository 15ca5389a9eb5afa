"""Path counters of the rows router kernel (router_rows.cu built with -DDS4_ROWS_DEBUG): how many
rows took the screened path and their mean candidate count, the candidate list of the first row
that differs from the reference, and results against the reference on fresh inputs.

Builds from the pre-split source taken from git history (cuda_src/router_rows.cu and its headers
at commit 78d3901, via old_source.py), not from the working tree: the shipped rows kernels have no
path counters.

    python bench/lab/rows_paths.py          (GPU machine)
"""
import numpy as np, cupy as cp, ds4kern
from ds4kern.core.arrays import BFLOAT16
import old_source as R  # (bench/lab/old_source.py: the pre-split source and its launch helpers)
code = R.old_source("router_rows.cu")
names = [R.rows_name(d, sf, 8, lp) for d in ("float32", "bfloat16") for sf in (1, 2) for lp in (1, 2)]
mod = cp.RawModule(code=code, options=R.OPTIONS + ("-DDS4_ROWS_DEBUG",), name_expressions=names)
dbg = mod.get_global("ds4_rows_dbg")
D = cp.ndarray((24,), cp.uint64, dbg)
rng = np.random.default_rng(1)
def run(x, k, sf, bias=None, tok=0, lpt=2):
    T, E = x.shape
    dt = "float32" if x.dtype == np.float32 else "bfloat16"
    kern = mod.get_function(R.rows_name(dt, R.ROWS_SF[sf], 8, lpt))
    smem = R.rows_smem(8)
    w = cp.full((T, k), cp.nan, cp.float32); i = cp.full((T, k), -1, cp.int32)
    b = cp.asarray(bias) if bias is not None else np.uint64(0)
    D.fill(0); D[7] = tok
    xd = cp.asarray(x)
    kern(((T + 64 // lpt - 1) // (64 // lpt),), (64,), (xd, b, np.int64(T), np.int32(E), np.int32(k), np.float32(1.0),
              w, np.int64(k), np.int64(1), i, np.int64(k), np.int64(1), np.int32(3)), shared_mem=smem)
    return cp.asnumpy(i), D.get()
for dt in (np.float32, BFLOAT16):
    for sf in ("sigmoid", "sqrtsoftplus"):
        for bias in (None, (0.1 * rng.standard_normal(256)).astype(np.float32)):
            x = (rng.standard_normal((2000, 256)) * 2).astype(dt)
            i1, c = run(x, 6, sf, bias)
            _, i2 = ds4kern.router_topk(x, 6, score_function=sf, expert_bias=bias)
            bad = np.nonzero((i1 != i2).any(1))[0]
            print(np.dtype(dt).name, sf, "bias" if bias is not None else "", "differ:", len(bad),
                        "screened rows", c[0], "mean n %.2f" % (c[1] / max(1, c[0])))
            for t in bad[:1]:
                    i1, c = run(x, 6, sf, bias, tok=t)
                    print("  rows", i1[t], x[t, i1[t]].astype(np.float32), " ref", i2[t], x[t, i2[t]].astype(np.float32))
                    print("  n", c[6], "cands", c[8:8 + min(16, int(c[6]))].tolist(), x[t, c[8:8 + min(16, int(c[6]))].astype(int)].astype(np.float32))
