"""Command line: ``python -m ds4kern {run,info,compile-check}``.

``run`` is the main job: the DeepSeek-V4-Flash router problem (E=256, k=6, sqrtsoftplus with
expert bias, scaling 1.5), run with every variant that can take it, validated against the
reference, timed.  Without a GPU it runs the reference backend and says so.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np


def _gpu_status():
    """(cupy module or None, reason string)."""
    try:
        import cupy as cp
    except Exception as e:
        return None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"no CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return None, "no CUDA device"
    return cp, ""


def cmd_info(args) -> int:
    import ds4kern
    from ds4kern.core import kernels
    from ds4kern.core.registry import registry

    print(f"ds4kern {ds4kern.__version__}  python {platform.python_version()}  numpy {np.__version__}")
    cp, why = _gpu_status()
    if cp is None:
        print(f"GPU: none ({why}); numpy arrays run on the reference backend")
    else:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"GPU: {name} (sm_{props['major']}{props['minor']}, {props['multiProcessorCount']} SMs), "
              f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    variants = ds4kern.variants()
    print("plugins:")
    for info in registry.plugins.values():
        dist = f" [{info.dist}]" if info.dist else ""
        print(f"  {info.name} ({info.origin}{dist}): {info.status}")
    print("ops and variants:")
    for op in registry.ops():
        print(f"  {op}")
        for v in variants:
            if v.op == op:
                print(f"    {v.name:16s} backend={v.backend:5s} plugin={v.plugin}  {v.description}")
    print("kernel sources:")
    for rel in kernels.list_sources():
        fam = kernels.FAMILIES.get(rel)
        n = len(fam.name_expressions) if fam else 0
        print(f"  cuda_src/{rel}  ({n} instantiations)")
    return 0


FLASH = dict(num_experts=256, topk=6, score_function="sqrtsoftplus", scaling_factor=1.5)


def cmd_run(args) -> int:
    import ds4kern
    from ds4kern.core.arrays import BFLOAT16
    from ds4kern.ops.router.checks import compare_router, router_tolerances, router_topk64
    from ds4kern.ops.router import reference_router_topk

    E, k = FLASH["num_experts"], FLASH["topk"]
    rng = np.random.default_rng(args.seed)
    dt = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}[args.dtype]
    logits = rng.standard_normal((args.tokens, E), dtype=np.float32).astype(dt)
    bias = (0.1 * rng.standard_normal(E)).astype(np.float32)
    kw = dict(score_function=FLASH["score_function"], expert_bias=bias, scaling_factor=FLASH["scaling_factor"])
    print(f"DeepSeek-V4-Flash router: T={args.tokens} E={E} k={k} {args.dtype} logits, "
          f"sqrtsoftplus + bias, scaling {FLASH['scaling_factor']}")
    atol, rtol = router_tolerances(E)
    cp, why = _gpu_status()
    if cp is None:
        print(f"No GPU: {why}. Running the reference backend (numpy) only.")
        t0 = time.perf_counter()
        w, i = ds4kern.router_topk(logits, k, **kw)
        dt_s = time.perf_counter() - t0
        w64, i64, sel = router_topk64(logits.astype(np.float32), k, FLASH["score_function"], False, bias,
                                      FLASH["scaling_factor"])
        cmp = compare_router(w, i, w64, i64, sel, atol, rtol)
        print(f"{'variant':16s} {'plugin':22s} {'time':>12s}  check vs float64 scipy")
        print(f"{'reference':16s} {'ds4kern.ops.router':22s} {dt_s * 1e3:9.2f} ms  "
              f"{'ok' if cmp.ok else 'FAILED'} ({cmp})")
        return 0 if cmp.ok else 1

    from ds4kern.core.timing import copy_bandwidth, cuda_graph_time, cuda_time, device_name

    name = device_name()
    bw = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    w_ref, i_ref = reference_router_topk(logits, k, FLASH["score_function"], False, bias, FLASH["scaling_factor"])
    ref_sel = None
    x_d, b_d = cp.asarray(logits), cp.asarray(bias)
    nbytes = logits.nbytes + args.tokens * k * (4 + 4)
    print(f"minimal bytes {nbytes / 1e6:.2f} MB (logits read once, weights + int32 indices written once)")
    print("time: device time per call from a CUDA-graph replay; per call: CUDA events around plain calls")
    print(f"{'variant':16s} {'plugin':22s} {'time':>10s} {'per call':>10s} {'GB/s':>8s} {'% copy':>7s}  check vs reference")
    fails = 0
    for v in ds4kern.variants("router_topk"):
        if v.backend != "cuda":
            continue
        d = ds4kern.explain("router_topk", x_d, k, **{**kw, "expert_bias": b_d})
        if any(c.variant is v and c.rejected for c in d.candidates):
            reason = next(c.rejected for c in d.candidates if c.variant is v)
            print(f"{v.name:16s} {v.plugin:22s} skipped: {reason}")
            continue
        w, i = ds4kern.router_topk(x_d, k, **{**kw, "expert_bias": b_d}, variant=v.name)
        if ref_sel is None:
            from ds4kern.ops.router.checks import router_scores64
            ref_sel = router_scores64(logits.astype(np.float32), FLASH["score_function"], False, bias)[0]
        cmp = compare_router(cp.asnumpy(w), cp.asnumpy(i), w_ref, i_ref, ref_sel, atol, rtol)
        fails += not cmp.ok
        w_o, i_o = cp.empty_like(w), cp.empty_like(i)
        call = lambda j=0: ds4kern.router_topk(x_d, k, **{**kw, "expert_bias": b_d}, out=(w_o, i_o),  # noqa: E731
                                               variant=v.name)
        tp = cuda_time(call, warmup=5, repeat=args.repeat)
        try:
            t = cuda_graph_time(call, inner=10, repeat=max(5, args.repeat // 5))
        except Exception:  # variants that allocate or synchronise cannot be captured
            t = tp
        print(f"{v.name:16s} {v.plugin:22s} {t * 1e6:8.1f}us {tp * 1e6:8.1f}us {nbytes / t / 1e9:8.0f} "
              f"{100 * nbytes / t / bw:6.1f}%  "
              f"{'ok' if cmp.ok else 'FAILED'} ({cmp.tie_rows} near-tie rows)")
    return 1 if fails else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds4kern", description="ds4kern command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="main job: DeepSeek-V4-Flash router, every variant, validated and timed")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh inputs)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("info", help="versions, device, registered ops and variants")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("compile-check", help="compile every kernel with NVRTC (no GPU needed)", add_help=False)
    p.set_defaults(fn=None)
    p = sub.add_parser("profile", help="expert locality report of a routing payload or capture", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "profile":
        from ds4kern.locality.analysis import main as profile_main

        return profile_main(argv[1:])
    if argv and argv[0] == "compile-check":
        from ds4kern.core.compile_check import main as cc_main

        return cc_main(argv[1:])
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
