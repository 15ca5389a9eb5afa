"""Compile every kernel source and every name expression with NVRTC, without a GPU.

CuPy's own compile path asks the driver for the device, so it cannot run on a machine without
one.  NVRTC itself needs no device: this module drives its C API through ctypes, with the
library from the ``nvidia-cuda-nvrtc-cu12`` (or ``-cu13``) wheel, a CUDA toolkit, or CuPy's
search path, and the CUDA runtime headers (``cuda_bf16.h``, ...) from the
``nvidia-cuda-runtime-cu12`` wheel or a toolkit.

Command line: ``python -m ds4kern compile-check [--arch sm_80 sm_90] [-v]``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
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


def check_all(archs=DEFAULT_ARCHS, families=None, verbose=False) -> list[CheckResult]:
    """Compile every registered kernel family for every arch; raise NVRTCError on failure.

    The families are those the imported ops registered (``import ds4kern`` imports them all)."""
    if families is None and not kernels.FAMILIES:
        raise NVRTCError("no kernel families registered: import ds4kern (which imports its ops) first")
    nv = NVRTC()
    incs = find_include_dirs()
    if not incs:
        raise NVRTCError(
            "CUDA runtime headers (cuda_bf16.h) not found; install nvidia-cuda-runtime-cu12 "
            "(part of the test extra) or set DS4KERN_CUDA_INCLUDE"
        )
    fams = families if families is not None else list(kernels.FAMILIES.values())

    def one(fam, arch):
        code = kernels.load_source(fam.source)
        opts = list(fam.options) + [f"-arch={arch}", "--ptxas-options=-v"] + [f"-I{d}" for d in incs]
        t0 = time.perf_counter()
        size, lowered, log = nv.compile(code, fam.source, opts, list(fam.name_expressions))
        return CheckResult(fam.source, arch, len(lowered), size, time.perf_counter() - t0, _spill_lines(log), log)

    # ctypes drops the GIL during nvrtcCompileProgram, so threads compile in parallel.
    jobs = [(fam, arch) for fam in fams for arch in archs]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        results = list(ex.map(lambda j: one(*j), jobs))
    if verbose:
        for res in results:
            print(f"{res.source:24s} {res.arch}: {res.n_kernels} kernels, {res.cubin_bytes} bytes cubin, "
                  f"{res.seconds:.1f} s, spills: {len(res.spills)}")
    return results


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ds4kern compile-check", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS))
    ap.add_argument("-v", "--verbose", action="store_true", help="print ptxas resource usage too")
    args = ap.parse_args(argv)
    nv = NVRTC()
    print(f"NVRTC {'.'.join(map(str, nv.version()))} from {nv.path}")
    print(f"headers: {find_include_dirs()}")
    try:
        results = check_all(args.arch, verbose=True)
    except NVRTCError as e:
        print(e, file=sys.stderr)
        return 1
    if args.verbose:
        for r in results:
            print(f"--- {r.source} {r.arch}\n{r.log}")
    spills = [(r, s) for r in results for s in r.spills]
    for r, s in spills:
        print(f"warning: {r.source} {r.arch}: {s}")
    print(f"ok: {sum(r.n_kernels for r in results)} instantiations compiled")
    return 0
