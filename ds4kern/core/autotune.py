"""Autotune: time every supported variant on a problem's bucket, remember the winner.

Off by default.  Turn it on with ``DS4KERN_AUTOTUNE=1`` or :func:`enable` (or the
:func:`autotuning` context manager).  When on, the first call of an op in a bucket (for which no
``variant=`` and no override is given) runs each supported variant ``repeat`` times on the call's
own arguments, keeps the fastest, and records it in memory and in a JSON file:

- file: ``$DS4KERN_CACHE_DIR/autotune.json`` (default ``$XDG_CACHE_HOME/ds4kern`` or
  ``~/.cache/ds4kern``), written atomically (temporary file + rename);
- key: device name, compute capability, op, a hash of the op's folded kernel sources and options
  (so a changed kernel never serves a stale winner) and the bucket (which holds the dtypes);
- GPU variants are timed on the device: ``repeat`` replays of a CUDA graph of 10 calls after one
  warm-up, median (CUDA events around single calls when the calls cannot be captured); host
  variants with a wall clock.
- A variant with settings (``Variant.configs``) is timed once per setting; the entry records the
  winning variant and its setting.

Tuning never happens while a CUDA graph is being captured (the heuristic decides instead), and
a cached winner that can no longer run the problem (a plugin was removed) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .args import int_arg

__all__ = ["enable", "enabled", "autotuning", "cache_dir", "cache_path", "clear", "TIMERS"]

SCHEMA = 2  # 2: keys carry the kernel sources' hash instead of the version string
_lock = threading.Lock()
_state = {"enabled": None, "memory": {}, "loaded_from": None, "repeat": 10, "generation": 0}


def generation() -> int:
    """Bumped by :func:`clear`; the dispatcher's memo of decisions is keyed by it."""
    return _state["generation"]


def enabled() -> bool:
    if _state["enabled"] is not None:
        return _state["enabled"]
    return os.environ.get("DS4KERN_AUTOTUNE", "").lower() in ("1", "true", "yes", "on")


def enable(on: bool = True, repeat: Optional[int] = None) -> None:
    """Switch autotuning on or off for this process (overrides ``DS4KERN_AUTOTUNE``)."""
    if repeat is not None:
        repeat = int_arg("repeat", repeat, lo=1)
    _state["enabled"] = bool(on)
    if repeat is not None:
        _state["repeat"] = repeat


@contextlib.contextmanager
def autotuning(on: bool = True):
    """``with ds4kern.autotune.autotuning(): ...`` tunes inside the block only."""
    before = _state["enabled"]
    _state["enabled"] = bool(on)
    try:
        yield
    finally:
        _state["enabled"] = before


def cache_dir() -> Path:
    """``$DS4KERN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ds4kern``, else ``~/.cache/ds4kern``."""
    base = os.environ.get("DS4KERN_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "ds4kern")
    return Path(base)


def cache_path() -> Path:
    return cache_dir() / "autotune.json"


def clear(memory: bool = True, file: bool = False) -> None:
    """Forget tuned choices (in memory, and optionally the cache file)."""
    with _lock:
        _state["generation"] += 1
        if memory:
            _state["memory"].clear()
            _state["loaded_from"] = None
        if file:
            with contextlib.suppress(FileNotFoundError):
                cache_path().unlink()


def _device_key(backend: str) -> str:
    if backend == "cuda":
        import cupy as cp

        dev = cp.cuda.runtime.getDevice()
        props = cp.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"{name}|sm_{props['major']}{props['minor']}"
    return f"cpu:{platform.machine()}:{platform.processor() or 'unknown'}"


def _key(op: str, problem) -> str:
    from .op import OPS, sources_hash
    from .kernels import FAMILIES

    # ops without declared kernels (a plugin's) are keyed by every registered kernel source
    src = OPS[op].sources_hash() if op in OPS and OPS[op].kernels else sources_hash(FAMILIES.values())
    bucket = getattr(problem, "bucket", problem)
    return "|".join([_device_key(problem.backend), op, f"src {src}", repr(bucket)])


def _load() -> dict:
    path = cache_path()
    if _state["loaded_from"] == str(path):
        return _state["memory"]
    try:
        data = json.loads(path.read_text())
        if data.get("schema") == SCHEMA and isinstance(data.get("entries"), dict):
            for k, v in data["entries"].items():
                _state["memory"].setdefault(k, v)
    except (FileNotFoundError, json.JSONDecodeError, OSError, AttributeError):
        pass
    _state["loaded_from"] = str(path)
    return _state["memory"]


def _save(key: str, entry: dict) -> None:
    """Merge one entry into the file: read, update, write a temporary file, rename over."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
            data = {"schema": SCHEMA, "entries": {}}
    except (FileNotFoundError, json.JSONDecodeError, OSError, AttributeError):
        data = {"schema": SCHEMA, "entries": {}}
    data["entries"][key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _time_cuda(fn: Callable[[], None], repeat: int) -> float:
    """Device time: replays of a captured graph of the calls (host launch cost excluded); CUDA
    events around each call when the calls cannot be captured."""
    import cupy as cp

    from .timing import graph_device_time

    fn()  # warm-up: compiles
    try:
        return graph_device_time(fn, repeat)
    except Exception:
        pass
    s = cp.cuda.get_current_stream()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        a.record(s)
        fn()
        b.record(s)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return statistics.median(times)


def _time_host(fn: Callable[[], None], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# backend -> timer(fn, repeat) -> seconds; tests may replace entries
TIMERS: dict = {"cuda": _time_cuda, "numpy": _time_host}


def _capturing(backend: str) -> bool:
    """Is the current CuPy stream capturing a CUDA graph?  (True when it cannot be told.)"""
    if backend != "cuda":
        return False
    import cupy as cp

    s = cp.cuda.get_current_stream()
    probe = getattr(s, "is_capturing", None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:
            pass
    try:  # the driver's answer: CU_STREAM_CAPTURE_STATUS_NONE == 0
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        status = ctypes.c_int(0)
        rc = lib.cuStreamIsCapturing(ctypes.c_void_p(s.ptr), ctypes.byref(status))
        return rc != 0 or status.value != 0
    except Exception:
        return True


def entry_label(entry: dict) -> str:
    """``variant`` or ``variant[key=value,...]`` of a cache entry (see ``Variant.label``)."""
    cfg = entry.get("config") or {}
    if not cfg:
        return entry["variant"]
    return f"{entry['variant']}[{','.join(f'{k}={v}' for k, v in sorted(cfg.items()))}]"


def lookup(op: str, problem, labels) -> Optional[dict]:
    """The cached entry for this op and bucket if its winner (variant and setting) is among
    ``labels``."""
    with _lock:
        entry = _load().get(_key(op, problem))
    if entry and isinstance(entry.get("variant"), str) and entry_label(entry) in labels:
        return entry
    return None


def tune(op: str, problem, candidates: list, run: Callable) -> Optional[dict]:
    """Time ``run(variant)`` for each candidate (a variant with its setting bound); store and
    return the winning entry.

    Returns None (and stores nothing) when tuning is impossible right now (graph capture).
    """
    if _capturing(problem.backend):
        return None
    timer = TIMERS[problem.backend]
    times = {}
    for v in candidates:
        times[v.label] = timer(lambda v=v: run(v), _state["repeat"])
    best_label = min(times, key=times.get)
    best = next(v for v in candidates if v.label == best_label)
    entry = {"variant": best.name, "config": dict(best.config),
             "times_us": {k: round(t * 1e6, 3) for k, t in times.items()},
             "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeat": _state["repeat"]}
    key = _key(op, problem)
    with _lock:
        _load()[key] = entry
        _save(key, entry)
    return entry
