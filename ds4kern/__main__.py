"""Command line: ``python -m ds4kern {run,router,attention,info,profile,scope-stats,compile-check}``.

``run`` is the main job: DeepSeek-V4 decode steps built from ds4kern ops, first checked against
the float64 reference at the small config, then (on a GPU) a Flash step of a few layers timed,
with its per-op table, tokens per second and memory-scope peaks.  Without a GPU it runs the
check on the reference backend and says so.  ``router`` is the router problem (E=256, k=6,
sqrtsoftplus with expert bias, scaling 1.5) with every variant that can take it.

An ordinary mistake (a missing or malformed input file, a bad option value, an output folder
that does not exist, a missing optional dependency) is one line on stderr and exit code 2,
found before any long work starts.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import numpy as np


class UsageError(Exception):
    """An ordinary mistake on the command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v

    return parse


def _int_list(lo: int):
    """Comma-separated integers >= lo (empty: none)."""
    one = _int_at_least(lo)

    def parse(text: str) -> list:
        return [one(v.strip()) for v in text.split(",") if v.strip()]

    return parse


def _top(text: str):
    if text == "all":
        return text
    try:
        return _int_at_least(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 or 'all', got {text!r}") from None


def _input_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _output_file(text: str) -> str:
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist (for {text})")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file name")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into the folder {folder}")
    return text


def _arch(text: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", text):
        raise argparse.ArgumentTypeError(f"must name a GPU architecture such as sm_80 or sm_90, got {text!r}")
    return text


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


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_run(args) -> int:
    from ds4kern.core import scope
    from ds4kern.models.deepseek_v4 import config as C
    from ds4kern.models.deepseek_v4.model import layer_bytes
    from ds4kern.models.deepseek_v4.run import capture_hooks, check_steps, time_step

    cp, why = _gpu_status()
    xp = np if cp is None else cp
    if cp is None:
        print(f"No GPU: {why}. Running the reference backend (numpy) at the small config only.")
    small = C.small(512)
    print(f"check: DeepSeek-V4 small config ({small.layers} layers: hash-routed SWA, CSA, HCA, CSA; D={small.dim}, "
          f"E={small.experts}), B={args.check_batch}, {args.check_steps} decode steps from position 0, "
          f"{'GPU' if cp is not None else 'numpy'} vs the float64 reference")
    t0 = time.perf_counter()
    r = check_steps(small, args.check_batch, args.check_steps, xp=xp, seed=args.seed)
    print(f"  worst relative error {r['worst']:.2e} (bar 2e-2): {'ok' if r['ok'] else 'FAILED'} "
          f"({time.perf_counter() - t0:.1f} s)")
    if cp is None or not r["ok"]:
        return 0 if r["ok"] else 1
    cfg = {"flash": C.flash, "pro": C.pro}[args.model](-(-(args.context + 4 * args.steps + 64) // 512) * 512)
    L = args.layers
    per = [layer_bytes(cfg, i, args.batch, args.resident) for i in range(L)]
    tot = {k: sum(p[k] for p in per) for k in per[0]}
    print(f"\nDeepSeek-V4 {args.model}: {L} layers ({', '.join(cfg.kind(i) for i in range(L))}), B={args.batch}, "
          f"context {args.context}, resident experts {args.resident or cfg.experts}/{cfg.experts}")
    print(f"  memory: routed experts {_fmt_bytes(tot['experts'])}, other weights {_fmt_bytes(tot['other_weights'])}, "
          f"KV state {_fmt_bytes(tot['state'])}")
    from ds4kern.core.timing import copy_bandwidth, device_name
    print(f"  device: {device_name()}; copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s")
    hooks = capture_hooks(cfg, L, args.capture, args.recorder) if (args.capture or args.recorder) else None
    out = time_step(cfg, args.batch, args.context, layers=L, steps=args.steps, xp=cp, seed=args.seed,
                    resident=args.resident, hooks_factory=hooks)
    g = out.get("graph_step_s")
    print(f"  step: {1e3 * out['step_s']:.3f} ms plain calls"
          + (f", {1e3 * g:.3f} ms CUDA-graph replay" if g else "")
          + f"; {out['tokens_per_s']:.0f} tokens/s")
    if out.get("graph_error"):
        print(f"  (no CUDA-graph timing: the capture failed: {out['graph_error']})")
    if args.recorder:
        rec = out.get("recorder_step_s")
        print("  (the graph replay leaves the locality recorder out: its clocks are host values"
              + (f"; its per-step kernels alone: {1e6 * rec:.1f} us" if rec is not None else "") + ")")
    print(f"\n{'part (all layers, synchronised pass)':40s} {'ms / step':>10s} {'share':>7s}")
    whole = sum(v for _, v in out["table"]) or 1.0
    for k, v in out["table"]:
        print(f"{k:40s} {1e3 * v:10.3f} {100 * v / whole:6.1f}%")
    print("\nscope peaks (CuPy pool bytes in use):")
    print(scope.format_summary(out["peaks"]))
    return 0


def cmd_router(args) -> int:
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


def _need_matplotlib() -> None:
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError("--png needs matplotlib, which is not installed: pip install 'ds4kern[plot]'") from None


def _load_routing(path: str):
    """``(selections [records, layers, k], start)`` from a payload (.json) or capture (.npy)."""
    import json

    from ds4kern.locality.analysis import load_selections

    try:
        arr, start = load_selections(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    except (OSError, EOFError, ValueError, TypeError) as e:  # unreadable, truncated, malformed
        raise UsageError(f"{path}: {e}") from None
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{path}: expert ids must be integers, got dtype {arr.dtype}")
    return arr, start


def cmd_profile(args) -> int:
    """Expert locality report of a payload or capture (JSON, summary table, optional PNG)."""
    import json

    from ds4kern.locality.analysis import analyze, render_png, summary_text

    if args.png:
        _need_matplotlib()
    arr, start = _load_routing(args.file)
    R, L, _ = arr.shape
    E = args.experts
    if E is None:
        if arr.dtype != np.uint8:
            raise UsageError(f"--experts is required for {arr.dtype} data (only uint8 data implies 256)")
        E = 256
    beyond = [x for x in args.hash_layers if x >= L]
    if beyond:
        raise UsageError(f"--hash-layers: layer(s) {beyond} beyond the {L} layers of {args.file} (0 .. {L - 1})")
    show = not args.quiet and R * L >= 100_000

    def progress(done, total):
        if show:
            bar = "#" * int(30 * done / total)
            print(f"\r[{bar:<30}] layer {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = analyze(arr, E, positions=start + np.arange(R), hash_layers=args.hash_layers,
                     cache_sizes=args.cache_sizes, top_n=args.top, source=str(args.file), model=args.model,
                     progress=progress)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.png:
        render_png(report, args.png)
    if not args.quiet:
        print(summary_text(report))
    return 0


def _op_table(records, steps: int, block_seconds: float, block: str = "attention") -> str:
    """Per-scope device time per step (scopes synchronised at entry and exit) and share of the block."""
    tot = {}
    for r in records:
        if r["path"].startswith(block + "/") and r["path"].count("/") == 1:
            tot[r["path"]] = tot.get(r["path"], 0.0) + float(r.get("seconds", 0.0))
    lines = [f"{'part of the block':36s} {'ms / step':>10s} {'share':>7s}"]
    whole = sum(tot.values()) or 1.0
    for path, sec in sorted(tot.items(), key=lambda kv: -kv[1]):
        lines.append(f"{path:36s} {1e3 * sec / steps:10.3f} {100 * sec / whole:6.1f}%")
    lines.append(f"{'block (no synchronisation, median)':36s} {1e3 * block_seconds:10.3f}")
    return "\n".join(lines)


def cmd_attention(args) -> int:
    import tempfile

    from ds4kern.core import scope
    from ds4kern.models.deepseek_v4 import (LayerState, attention_decode, attention_prefill, flash, pro,
                                            random_attention_weights, small)

    cp, why = _gpu_status()
    xp = np if cp is None else cp
    model = args.model
    if cp is None:
        print(f"No GPU: {why}. Running the reference backend (numpy) at the small config.")
        model = "small"
    B, N, steps, T = args.batch, args.context, args.steps, args.prefill
    max_context = -(-(N + (steps + 1) * max(T, 1) + 1) // 512) * 512
    cfg = {"flash": flash, "pro": pro, "small": small}[model](max_context)
    positions = np.maximum(N - 7 * (np.arange(B) % 4), 0)  # mixed lengths in one batch
    what = (f"prefill of {T} tokens of sequence 0 (from position {positions[0]}; {B} sequences in the state)" if T
            else f"decode, B={B} at positions {positions.min()}..{positions.max()}")
    print(f"DeepSeek-V4 {model} attention block, {args.layer_kind} layer: {what} "
          f"({'GPU' if cp is not None else 'numpy'}), {steps} timed steps")
    w = random_attention_weights(cfg, args.layer_kind, args.seed).to(xp)
    st = LayerState(cfg, args.layer_kind, B, xp).fill_random(positions, args.seed)
    X = xp.asarray(np.random.default_rng(args.seed).standard_normal((T or B, 4, cfg.dim), dtype=np.float32))
    block = "attention_prefill" if T else "attention"

    def one_step():
        if T:
            attention_prefill(cfg, w, st, X, 0)
        else:
            attention_decode(cfg, w, st, X, st.next_pos.copy())
    stats = scope.stats_path()
    scope.set_stats_path(None)
    times = []
    try:
        for i in range(steps + 1):  # the first step compiles the kernels
            t0 = time.perf_counter()
            one_step()
            if cp is not None:
                cp.cuda.get_current_stream().synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            if not args.quiet and steps >= 20 and i % max(1, steps // 10) == 0:
                print(f"  step {i}/{steps}", file=sys.stderr)
        block_s = float(np.median(times))
        path = stats or tempfile.mktemp(suffix=".jsonl")
        scope.set_stats_path(path)
        scope.set_sync(True)  # second pass: each part synchronised, for the table
        for _ in range(steps):
            one_step()
    finally:
        scope.set_sync(False)
        scope.set_stats_path(stats)
    recs = [r for r in scope.read_stats(path) if r["path"].split("/")[0] == block]
    if not stats:
        os.unlink(path)
    print(_op_table(recs, steps, block_s, block))
    peaks = scope.summarize(recs)
    print("\nscope peaks (CuPy pool bytes in use):")
    print(scope.format_summary(peaks))
    return 0


def cmd_scope_stats(args) -> int:
    from ds4kern.core.scope import format_summary, read_stats, summarize

    if args.png:
        _need_matplotlib()
    try:
        rows = summarize(read_stats(args.file))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not rows:
        raise UsageError(f"{args.file} holds no scope records")
    print(format_summary(rows))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
        ax.barh([r["path"] for r in rows][::-1], [r["peak_bytes"] / 2**20 for r in rows][::-1])
        ax.set_xlabel("peak MiB in use (CuPy pool)")
        ax.set_title(f"scope peaks: {os.path.basename(args.file)}")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return 0


def cmd_compile_check(args) -> int:
    from ds4kern.core.compile_check import run_check

    return run_check(args.arch, cache=not args.no_cache, verbose=args.verbose)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m ds4kern", description="ds4kern command line: python -m ds4kern COMMAND --help "
                 "describes each command")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands", required=True)
    p = sub.add_parser("run", help="main job: DeepSeek-V4 decode step, checked against float64, timed",
                       description="DeepSeek-V4 decode steps built from ds4kern ops: first the small config "
                                   "(4 layers) checked against the float64 reference, then on a GPU a step of "
                                   "--layers layers of the chosen model timed, with its per-op table, tokens per "
                                   "second and memory-scope peaks (without a GPU: only the check, on the "
                                   "reference backend).")
    p.add_argument("--model", choices=["flash", "pro"], default="flash", help="config timed (default %(default)s)")
    p.add_argument("--layers", type=_int_at_least(1), default=4, help="layers timed (default %(default)s)")
    p.add_argument("--batch", type=_int_at_least(1), default=64, help="sequences B (default %(default)s)")
    p.add_argument("--context", type=_int_at_least(0), default=65536,
                   help="tokens in each sequence's cache (default %(default)s)")
    p.add_argument("--steps", type=_int_at_least(1), default=10, help="timed decode steps (default %(default)s)")
    p.add_argument("--resident", type=_int_at_least(1), default=None,
                   help="expert weight sets held per layer (default: all; expert e runs those of e mod N)")
    p.add_argument("--capture", action="store_true", help="routing capture on inside the step")
    p.add_argument("--recorder", action="store_true", help="locality recorder on inside the step")
    p.add_argument("--check-batch", type=_int_at_least(1), default=2, help="sequences of the check (default 2)")
    p.add_argument("--check-steps", type=_int_at_least(1), default=8, help="decode steps of the check (default 8)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of weights, caches and tokens")
    p.add_argument("--scope-stats", type=_output_file, metavar="PATH",
                   help="write memory-scope statistics (JSON lines, one per scope exit) to PATH")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("router", help="DeepSeek-V4-Flash router, every variant, validated and timed",
                       description="The DeepSeek-V4-Flash router (E=256, k=6, sqrtsoftplus + bias, scaling 1.5) "
                                   "with every variant that can run it, checked and timed (without a GPU: the "
                                   "reference backend against a float64 formulation).")
    p.add_argument("--tokens", type=_int_at_least(1), default=4096, help="tokens T (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the logits (default %(default)s)")
    p.add_argument("--repeat", type=_int_at_least(1), default=100,
                   help="timed calls per variant on the GPU (default %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=None, help="random seed (default: fresh inputs)")
    p.add_argument("--scope-stats", type=_output_file, metavar="PATH",
                   help="write memory-scope statistics (JSON lines, one per scope exit) to PATH")
    p.set_defaults(fn=cmd_router)
    p = sub.add_parser("attention", help="DeepSeek-V4 attention block (decode or prefill): per-op time table, scope peaks",
                       description="One layer's attention block, decode steps of B sequences at mixed positions "
                                   "near --context, random weights and caches of the real shapes; prints the "
                                   "block time, each part's share and the memory-scope peaks (without a GPU: the "
                                   "reference backend at the small config).")
    p.add_argument("--model", choices=["flash", "pro", "small"], default="flash", help="config (default %(default)s)")
    p.add_argument("--layer-kind", choices=["csa", "hca", "swa"], default="csa", help="layer kind (default %(default)s)")
    p.add_argument("--batch", type=_int_at_least(1), default=8, help="sequences B (default %(default)s)")
    p.add_argument("--context", type=_int_at_least(0), default=4096,
                   help="tokens already in each sequence's cache (default %(default)s)")
    p.add_argument("--steps", type=_int_at_least(1), default=10, help="timed decode steps (default %(default)s)")
    p.add_argument("--prefill", type=_int_at_least(0), default=0, metavar="T",
                   help="time a prefill chunk of T tokens of one sequence instead of decode (default: decode)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of weights, caches and inputs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--scope-stats", type=_output_file, metavar="PATH",
                   help="also keep the memory-scope statistics (JSON lines) in PATH")
    p.set_defaults(fn=cmd_attention)
    p = sub.add_parser("info", help="versions, device, plugins, registered ops and variants, kernel sources",
                       description="Versions, the device, plugins, every op and variant, the kernel sources.")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("profile", help="expert locality report of a routing payload (.json) or capture (.npy)",
                       description="Expert locality report (JSON, a summary table, optionally a PNG) of a "
                                   "routing-replay payload (.json) or a capture saved with numpy.save (.npy).")
    p.add_argument("file", type=_input_file, help="payload (.json) or capture [records, layers, k] (.npy)")
    p.add_argument("--out", required=True, type=_output_file, help="JSON report to write")
    p.add_argument("--png", type=_output_file,
                   help="picture to write; needs matplotlib: pip install 'ds4kern[plot]'")
    p.add_argument("--experts", type=_int_at_least(1), help="number of experts E (default 256 for uint8 data)")
    p.add_argument("--hash-layers", type=_int_list(0), default=[],
                   help="comma-separated hash-routed layers, e.g. 0,1,2")
    p.add_argument("--cache-sizes", type=_int_list(1), default=[],
                   help="comma-separated extra LRU cache sizes besides the powers of two")
    p.add_argument("--top", type=_top, default=16, help="top experts per layer in the report, or 'all' (default 16)")
    p.add_argument("--model", default="", help="model name written into the report")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(fn=cmd_profile)
    p = sub.add_parser("scope-stats", help="peak memory per scope from a --scope-stats file",
                       description="Summarise a memory-scope statistics file (written by --scope-stats or "
                                   "DS4KERN_SCOPE_STATS): calls and peak bytes per scope, optionally as a bar chart.")
    p.add_argument("file", type=_input_file, help="scope statistics (JSON lines)")
    p.add_argument("--png", type=_output_file, help="bar chart to write; needs matplotlib: pip install 'ds4kern[plot]'")
    p.set_defaults(fn=cmd_scope_stats)
    p = sub.add_parser("compile-check", help="compile every kernel with NVRTC (no GPU needed)",
                       description="NVRTC compile of every kernel source and instantiation, without a GPU; "
                                   "passing results are kept in $DS4KERN_CACHE_DIR/nvrtc (default "
                                   "~/.cache/ds4kern/nvrtc) and not compiled again while unchanged.")
    p.add_argument("--arch", nargs="+", type=_arch, default=["sm_80", "sm_90"], metavar="SM",
                   help="architectures to compile for (default: sm_80 sm_90)")
    p.add_argument("--no-cache", action="store_true", help="compile everything, even what passed unchanged before")
    p.add_argument("-v", "--verbose", action="store_true", help="print ptxas resource usage too")
    p.set_defaults(fn=cmd_compile_check)
    return ap


def main(argv=None) -> int:
    ap = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        ap.print_help()
        return 0
    args = ap.parse_args(argv)
    stats = getattr(args, "scope_stats", None)
    try:
        if stats:
            from ds4kern.core import scope

            open(stats, "w").close()  # this run's statistics only
            scope.set_stats_path(stats)
            try:
                if args.cmd in ("attention", "run"):  # their scopes are the blocks' own ("attention/...", "step/...")
                    rc = args.fn(args)
                else:
                    with scope.scope(args.cmd):
                        rc = args.fn(args)
            finally:
                scope.set_stats_path(None)
            rows = scope.summarize(scope.read_stats(stats))
            print(f"\nmemory scopes ({stats}):\n{scope.format_summary(rows)}")
            return rc
        return args.fn(args)
    except UsageError as e:
        print(f"python -m ds4kern {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0


if __name__ == "__main__":
    sys.exit(main())
