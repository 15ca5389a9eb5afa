"""A/B of builds of the rows router kernel, DeepSeek-V4-Flash (E=256, k=6, sqrtsoftplus + bias;
``--config v3``: the grouped form, E=256, k=8, sigmoid + bias, 8 groups, top 4) (GPU machine):
the default build ("lib") beside another version of the source (--baseline) and builds with extra
defines (--form name=-DDS4_ROWS_PD=8,..., -DDS4_ROWS_L2PF=0 / 64 / 128 / 256: the loads' L2
prefetch-size hint, 128 for float32 by default).

Builds from the pre-split source taken from git history (cuda_src/router_rows.cu and its headers
at commit 78d3901, via old_source.py), not from the working tree: the -D branches swept here are
not in the shipped kernels.  That source's default build ("lib") is byte-identical to the shipped
rows kernels (cuda_src/router/rows.cu, rows_grouped.cu).

    python bench/lab/rows_ab.py [--tokens 16384 65536 131072] [--scales 1 3]
                                [--baseline old_router_rows.cu --baseline-smem BYTES] [--form ...]
    ncu --kernel-name regex:rows --launch-skip 2 --launch-count 1 python bench/lab/rows_ab.py --profile lib

For each dtype, T and logit scale (logits = scale * randn, bias = 0.1 * randn as in
router_bench): every build's outputs compared bit for bit, CUDA-graph replay medians with the
inputs rotating past the L2 cache, % of the copy bandwidth measured in the same run (best
build), and the path counters of -DDS4_ROWS_DEBUG builds (mean candidates per row, % of rows on
the exact path, and for v3 % of rows whose screened group choice was not certain).
"""

import argparse

import cupy as cp
import numpy as np

from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, device_name

import old_source as R  # (bench/lab/old_source.py: the pre-split source and its launch helpers)

E, K = 256, 6
CFG = dict(flash=dict(k=6, sf=2, groups=(0, 0), scaling=1.5), v3=dict(k=8, sf=1, groups=(8, 4), scaling=2.5))
cfg = CFG["flash"]
DTYPES = {"float32": np.float32, "bfloat16": BFLOAT16}


def modules(baseline=None, extra_forms=()):
    code = R.old_source("router_rows.cu")
    names = [kname(d) for d in DTYPES]
    base = R.OPTIONS
    out = {}
    forms = [("lib", code, ())]
    for spec in extra_forms:  # name=-DA=1,-DB  (defines added to the default build)
        name, defs = spec.split("=", 1)
        forms.append((name, code, tuple(defs.split(","))))
    if baseline:  # another version of router_rows.cu, its headers from the same commit as "lib"
        text = R.fold(open(baseline).read(), "cuda_src/router_rows.cu")
        forms.append(("base", text, ()))
    for form, src, extra in forms:
        for dbg in (False, True):
            opts = base + extra + (("-DDS4_ROWS_DEBUG",) if dbg else ())
            out[form, dbg] = cp.RawModule(code=src, options=opts, name_expressions=names)
    return out


def kname(dt):
    return R.rows_grouped_name(dt, cfg["sf"]) if cfg["groups"][0] else R.rows_name(dt, cfg["sf"], 8, 2)


def launch(mod, dt, x, b, w, i, smem=None, warps=None):
    T = x.shape[0]
    kern = mod.get_function(kname(dt))
    tiles = (T + 15) // 16
    warps = warps or R.ROWS_WARPS
    K = cfg["k"]
    extra = tuple(np.int32(g) for g in cfg["groups"]) if cfg["groups"][0] else ()
    kern(((tiles + warps - 1) // warps,), (32 * warps,),
         (x, b, np.int64(T), np.int32(E), np.int32(K), np.float32(cfg["scaling"]), w, np.int64(K), np.int64(1),
          i, np.int64(K), np.int64(1), np.int32(3)) + extra, shared_mem=smem or R.rows_smem(8, warps, bool(cfg["groups"][0])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--baseline", help="a .cu file with another version of (pre-split) router_rows.cu, timed beside")
    ap.add_argument("--form", action="append", default=[], help="extra build: name=-DX=1,-DY (DS4_ROWS_WARPS=n sets the block)")
    ap.add_argument("--baseline-smem", type=int, default=0, help="its dynamic shared memory per block")
    ap.add_argument("--profile", help="only launch this form (lib, base or a --form name) 4 times (T=65536)")
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--config", default="flash", choices=tuple(CFG))
    a = ap.parse_args()
    global cfg
    cfg = CFG[a.config]
    K = cfg["k"]
    mods = modules(a.baseline, a.form)
    forms = (("base",) if a.baseline else ()) + ("lib",) + tuple(f.split("=", 1)[0] for f in a.form)
    smem = {"base": a.baseline_smem}
    warps = {f.split("=", 1)[0]: int(f.split("DS4_ROWS_WARPS=")[1].split(",")[0]) for f in a.form if "DS4_ROWS_WARPS=" in f}
    if a.profile:
        T = 65536
        x = cp.asarray(np.random.default_rng(0).standard_normal((T, E), dtype=np.float32).astype(DTYPES[a.dtype]))
        b = cp.asarray((0.1 * np.random.default_rng(1).standard_normal(E)).astype(np.float32))
        w, i = cp.empty((T, K), cp.float32), cp.empty((T, K), cp.int32)
        for _ in range(4):
            launch(mods[a.profile, False], a.dtype, x, b, w, i, smem.get(a.profile))
        cp.cuda.Device().synchronize()
        return
    bw = copy_bandwidth()
    print(f"device: {device_name()}, copy {bw / 1e9:.0f} GB/s")
    print(f"config {a.config}: {cfg}")
    print("| dtype | T | scale | " + " | ".join(f"{f} µs" for f in forms) + " | % copy (best) | equal | "
          + " | ".join(f"cand/row {f}" for f in forms) + " | % exact rows | % unsure groups |")
    print("|---" * (7 + 2 * len(forms)) + "|")
    rng = np.random.default_rng(0)
    for dt, npdt in DTYPES.items():
        for T in a.tokens:
            for scale in a.scales:
                nsets = max(1, -(-(256 << 20) // (T * E * np.dtype(npdt).itemsize)))
                xs = [cp.asarray((scale * rng.standard_normal((T, E), dtype=np.float32)).astype(npdt))
                      for _ in range(min(nsets, 16))]
                b = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
                outs = {}
                times = {}
                counts = {}
                for form in forms:
                    w = cp.full((T, K), cp.nan, cp.float32)
                    i = cp.full((T, K), -1, cp.int32)
                    sm, wp = smem.get(form), warps.get(form)
                    launch(mods[form, False], dt, xs[0], b, w, i, sm, wp)
                    outs[form] = (cp.asnumpy(w), cp.asnumpy(i))
                    times[form] = cuda_graph_time(lambda j, form=form: launch(mods[form, False], dt, xs[j % len(xs)], b, w, i, sm, wp),
                                                  inner=min(20, max(2, len(xs))), repeat=30)
                    dm = mods[form, True]
                    D = cp.ndarray((24,), cp.uint64, dm.get_global("ds4_rows_dbg"))
                    D.fill(0)
                    D[7] = np.uint64(1 << 62)
                    launch(dm, dt, xs[0], b, w, i, sm, wp)
                    c = D.get()
                    counts[form] = c[1] / max(1, c[0])
                    if form == "lib":
                        paths = (100 * (1 - c[0] / T), 100 * c[2] / T)
                ref = outs[forms[0]]
                eq = all(np.array_equal(ref[1], o[1]) and np.array_equal(ref[0].view(np.uint32), o[0].view(np.uint32))
                         for o in outs.values())
                nbytes = T * E * np.dtype(npdt).itemsize + T * K * 8
                pct = 100 * nbytes / min(times.values()) / bw
                print(f"| {dt} | {T} | {scale:g} | " + " | ".join(f"{times[f] * 1e6:.1f}" for f in forms)
                      + f" | {pct:.1f} | {'yes' if eq else 'NO'} | " + " | ".join(f"{counts[f]:.2f}" for f in forms)
                      + f" | {paths[0]:.2f} | {paths[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
