"""Compile every kernel source and every name expression with NVRTC, without a GPU.

CuPy's own compile path asks the driver for the device, so it cannot run on a machine without
one.  NVRTC itself needs no device: this module drives its C API through ctypes, with the
library from the ``nvidia-cuda-nvrtc-cu12`` (or ``-cu13``) wheel, a CUDA toolkit, or CuPy's
search path, and the CUDA runtime headers (``cuda_bf16.h``, ...) from the
``nvidia-cuda-runtime-cu12`` wheel or a toolkit.

Each (source, arch) is one NVRTC program holding all the source's name expressions; the programs
compile in parallel threads (NVRTC releases the GIL), the largest first.  A passing result is kept
under ``<cache dir>/nvrtc`` (``$DS4KERN_CACHE_DIR``, default ``~/.cache/ds4kern``), keyed by a
hash of the folded source, the name expressions, the options and arch, the NVRTC library and its
version and the CUDA headers' names, sizes and times: what has not changed is not compiled again.
Failures are never cached.

Command line: ``python -m ds4kern compile-check [--arch sm_80 sm_90] [--no-cache] [-v]``.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import kernels

DEFAULT_ARCHS = ("sm_80", "sm_90")


class NVRTCError(RuntimeError):
    pass


def _site_dirs() -> list[Path]:
    out = []
    for p in sys.path:
        if p and os.path.isdir(p):
            out.append(Path(p))
    return out


def _candidates_lib() -> list[str]:
    cands = []
    env = os.environ.get("DS4KERN_NVRTC")
    if env:
        cands.append(env)
    for sp in _site_dirs():
        for sub in ("nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib64"):
            cands += sorted(glob.glob(str(sp / sub / "libnvrtc.so.*")), reverse=True)
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cands += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")), reverse=True)
    cands += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    # keep only real libraries (not the builtins or the .alt variant), first one wins
    seen, out = set(), []
    for c in cands:
        base = os.path.basename(c)
        if "builtins" in base or ".alt." in base or c in seen:
            continue
        seen.add(c)
        out.append(c)
    return out


def find_include_dirs() -> list[str]:
    """Folders holding ``cuda_fp16.h`` / ``cuda_bf16.h`` (NVRTC ships neither)."""
    dirs = []
    env = os.environ.get("DS4KERN_CUDA_INCLUDE")
    if env:
        dirs += env.split(os.pathsep)
    for sp in _site_dirs():
        for sub in ("nvidia/cuda_runtime/include", "nvidia/cu13/include", "nvidia/cuda_nvrtc/include"):
            d = sp / sub
            if (d / "cuda_bf16.h").is_file():
                dirs.append(str(d))
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_bf16.h")):
            dirs.append(os.path.join(root, "include"))
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


class NVRTC:
    """The few NVRTC calls the check needs."""

    def __init__(self, path: str | None = None):
        errors = []
        for cand in ([path] if path else _candidates_lib()):
            try:
                self.lib = ctypes.CDLL(cand)
                self.path = cand
                break
            except OSError as e:
                errors.append(f"{cand}: {e}")
        else:
            raise NVRTCError(
                "NVRTC library not found; install the test extra (pip install 'ds4kern[test]', "
                "which brings nvidia-cuda-nvrtc-cu12) or set DS4KERN_NVRTC. Tried: "
                + "; ".join(errors[:6])
            )
        L = self.lib
        L.nvrtcGetErrorString.restype = ctypes.c_char_p
        L.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p),
        ]
        L.nvrtcAddNameExpression.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        L.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        L.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        L.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        L.nvrtcGetCUBINSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        L.nvrtcGetLoweredName.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
        L.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def _check(self, rc: int, what: str):
        if rc != 0:
            raise NVRTCError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def version(self) -> tuple[int, int]:
        a, b = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)), "nvrtcVersion")
        return a.value, b.value

    def compile(self, code: str, name: str, options: list[str], name_expressions: list[str]):
        """Compile; returns (cubin size, {name expression: lowered name}, log)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            for ne in name_expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, ne.encode()), f"nvrtcAddNameExpression({ne})")
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                raise NVRTCError(f"compiling {name} failed:\n{log}")
            csize = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(csize)), "nvrtcGetCUBINSize")
            lowered = {}
            for ne in name_expressions:
                out = ctypes.c_char_p()
                self._check(self.lib.nvrtcGetLoweredName(prog, ne.encode(), ctypes.byref(out)), "nvrtcGetLoweredName")
                lowered[ne] = out.value.decode()
            return csize.value, lowered, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@dataclass
class CheckResult:
    source: str
    arch: str
    n_kernels: int
    cubin_bytes: int
    seconds: float
    spills: list[str] = field(default_factory=list)
    log: str = ""
    cached: bool = False


def _spill_lines(log: str) -> list[str]:
    """ptxas -v lines that report spills or a stack frame (register arrays gone to memory)."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if ("spill stores" in low and " 0 bytes spill stores" not in low) or (
            "bytes stack frame" in low and " 0 bytes stack frame" not in low
        ):
            bad.append(line.strip())
    return bad


def cache_dir() -> Path:
    """Where passing compile results are kept: ``<ds4kern cache dir>/nvrtc``."""
    from .autotune import cache_dir as base

    return base() / "nvrtc"


def _headers_stamp(incs: list[str]) -> str:
    """Names, sizes and modification times of the CUDA headers: another header release, another key."""
    h = hashlib.sha256()
    for d in incs:
        for root, _, files in sorted(os.walk(d)):
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                h.update(f"{root}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _entry_path(folder: Path, source: str, arch: str, key: str) -> Path:
    return folder / f"{source.replace('/', '--')}.{arch}.{key}.json"


def _load_entry(path: Path) -> CheckResult | None:
    try:
        d = json.loads(path.read_text())
        return CheckResult(**{**d, "spills": _spill_lines(d["log"]), "cached": True})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or unreadable: compile again


def _store_entry(path: Path, res: CheckResult) -> None:
    """Atomically (temporary file + rename); older entries of the same source and arch go."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = path.name.rsplit(".", 2)[0] + "."
        for old in path.parent.glob(glob.escape(prefix) + "*.json"):
            if old != path:
                old.unlink(missing_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        d = {k: v for k, v in res.__dict__.items() if k != "cached"}
        tmp.write_text(json.dumps(d))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder only costs the next run a compile


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compile_jobs(jobs, *, cache: Path | None = None, workers: int | None = None) -> dict:
    """Compile each ``(KernelFamily, arch)`` of ``jobs`` (all the family's name expressions in one
    NVRTC program), in parallel threads, the largest sources first.  Returns ``{(source, arch):
    CheckResult or NVRTCError}``: a failure is returned, naming the source and arch, not raised.
    ``cache``: the folder of kept results (None: compile everything)."""
    nv = NVRTC()
    incs = find_include_dirs()
    if not incs:
        raise NVRTCError(
            "CUDA runtime headers (cuda_bf16.h) not found; install nvidia-cuda-runtime-cu12 "
            "(part of the test extra) or set DS4KERN_CUDA_INCLUDE"
        )
    ident = f"{nv.path}|{nv.version()}|{_headers_stamp(incs)}" if cache is not None else ""

    def one(fam, arch):
        code = kernels.load_source(fam.source)
        opts = list(fam.options) + list(CUPY_APPENDED) + [f"-arch={arch}", "--ptxas-options=-v"] + [f"-I{d}" for d in incs]
        path = None
        if cache is not None:
            key = hashlib.sha256("\0\1".join([ident, code, *opts, "", *fam.name_expressions]).encode()).hexdigest()
            path = _entry_path(cache, fam.source, arch, key[:32])
            hit = _load_entry(path)
            if hit is not None:
                return hit
        t0 = time.perf_counter()
        try:
            size, lowered, log = nv.compile(code, fam.source, opts, list(fam.name_expressions))
        except NVRTCError as e:
            return NVRTCError(f"{fam.source} for {arch}: {e}")
        res = CheckResult(fam.source, arch, len(lowered), size, time.perf_counter() - t0, _spill_lines(log), log)
        if path is not None:
            _store_entry(path, res)
        return res

    # ctypes drops the GIL during nvrtcCompileProgram, so threads compile in parallel; the largest
    # (source length x instantiations: a fair guess of the time) first, so that none starts last
    order = sorted(jobs, key=lambda j: -len(kernels.load_source(j[0].source)) * len(j[0].name_expressions))
    n = max(1, min(len(order), workers or _workers()))
    with ThreadPoolExecutor(max_workers=n) as ex:
        done = list(ex.map(lambda j: one(*j), order))
    return {(fam.source, arch): r for (fam, arch), r in zip(order, done)}


# CuPy appends these to every NVRTC compile (cupy/cuda/compiler.py, _compile_with_cache_cuda): the
# check compiles what the device runs.  -ftz=true flushes subnormal float inputs and results of
# arithmetic and comparisons to zero; kernels that must keep subnormals use bit manipulation or
# non-ftz inline PTX.
CUPY_APPENDED = ("-ftz=true",)


def check_all(archs=DEFAULT_ARCHS, families=None, verbose=False, cache: bool = True) -> list[CheckResult]:
    """Compile every registered kernel family for every arch; raise NVRTCError naming each failed
    source and arch.  ``cache``: reuse and keep passing results (see the module docstring).

    The families are those the imported ops registered (``import ds4kern`` imports them all)."""
    if families is None and not kernels.FAMILIES:
        raise NVRTCError("no kernel families registered: import ds4kern (which imports its ops) first")
    fams = families if families is not None else list(kernels.FAMILIES.values())
    jobs = [(fam, arch) for fam in fams for arch in archs]
    out = compile_jobs(jobs, cache=cache_dir() if cache else None)
    failed = [r for r in out.values() if isinstance(r, NVRTCError)]
    if failed:
        raise NVRTCError("\n\n".join(str(e) for e in failed))
    results = [out[(fam.source, arch)] for fam, arch in jobs]
    if verbose:
        for res in results:
            how = "cached" if res.cached else f"{res.seconds:.1f} s"
            print(f"{res.source:24s} {res.arch}: {res.n_kernels} kernels, {res.cubin_bytes} bytes cubin, "
                  f"{how}, spills: {len(res.spills)}")
    return results


def run_check(archs=DEFAULT_ARCHS, cache: bool = True, verbose: bool = False) -> int:
    """``python -m ds4kern compile-check``: prints what compiled; 0 if everything did, else 1."""
    try:
        nv = NVRTC()
        print(f"NVRTC {'.'.join(map(str, nv.version()))} from {nv.path}")
        print(f"headers: {find_include_dirs()}")
        results = check_all(archs, verbose=True, cache=cache)
    except NVRTCError as e:
        print(e, file=sys.stderr)
        return 1
    if verbose:
        for r in results:
            print(f"--- {r.source} {r.arch}\n{r.log}")
    for r in results:
        for s in r.spills:
            print(f"warning: {r.source} {r.arch}: {s}")
    print(f"ok: {sum(r.n_kernels for r in results)} instantiations compiled")
    return 0


def main(argv=None) -> int:
    """The ``compile-check`` command of ``python -m ds4kern`` (its options: ``--help``)."""
    from ..__main__ import main as cli

    return cli(["compile-check", *(sys.argv[1:] if argv is None else argv)])
