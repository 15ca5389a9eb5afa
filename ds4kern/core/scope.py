"""Memory scopes: where scratch lives, and how much of it at once.

``with ds4kern.scope("attention"):`` marks a region.  Scopes nest; every op call runs inside a
scope named after the op, so a layer's scopes show which op holds memory.  When statistics are
on (the environment variable ``DS4KERN_SCOPE_STATS`` names a file, or :func:`set_stats_path` /
a command's ``--scope-stats PATH`` switch does), each scope exit appends one JSON line::

    {"name": "sparse_attention", "path": "layer/attention/sparse_attention", "depth": 2,
     "entry_bytes": ..., "exit_bytes": ..., "peak_bytes": ..., "allocations": ..., "seconds": ...}

``*_bytes`` are the bytes in use in CuPy's default memory pool of the current device (what
ds4kern's ops allocate from): on entry, on exit, and the largest value seen at any allocation
inside the scope (a CuPy memory hook).  ``allocations`` counts the pool allocations inside it.
Memory torch's caching allocator holds is not seen.  Without CuPy the byte fields are 0.

When statistics are off, :func:`scope` returns one shared object whose ``__enter__`` and
``__exit__`` do nothing (the cost is one dictionary lookup: the environment variable is read at
import and by :func:`refresh`, not at every call).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Optional

__all__ = ["scope", "set_stats_path", "set_sync", "stats_path", "refresh", "read_stats", "summarize", "format_summary", "ENV"]

ENV = "DS4KERN_SCOPE_STATS"
_cfg: dict = {"set": None, "env": os.environ.get(ENV) or None, "path": None, "sync": False}
_local = threading.local()
_write_lock = threading.Lock()


class _Off:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


_OFF = _Off()


def _update() -> None:
    _cfg["path"] = _cfg["set"] or _cfg["env"]


def set_stats_path(path: Optional[str]) -> None:
    """Turn statistics on, writing to ``path`` (appended), or back off with None (the
    environment variable then decides)."""
    _cfg["set"] = None if path is None else os.fspath(path)
    _update()


def set_sync(on: bool) -> None:
    """With statistics on, synchronise the device at every scope entry and exit, so that a
    scope's ``seconds`` is the device time of its work (for per-op tables; slows the run)."""
    _cfg["sync"] = bool(on)


def _sync() -> None:
    if _cfg["sync"]:
        try:
            import cupy
        except Exception:
            return
        cupy.cuda.get_current_stream().synchronize()


def refresh() -> None:
    """Read ``DS4KERN_SCOPE_STATS`` again (it is read once at import)."""
    _cfg["env"] = os.environ.get(ENV) or None
    _update()


def stats_path() -> Optional[str]:
    """Where scope statistics go now, or None when they are off."""
    return _cfg["path"]


def scope(name: str):
    """A context manager marking a memory scope named ``name`` (nestable); see the module doc."""
    path = _cfg["path"]
    if path is None:
        return _OFF
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"scope name must be a non-empty string without '/', got {name!r}")
    return _Scope(name, path)


def _pool():
    try:
        import cupy
    except Exception:
        return None
    return cupy.get_default_memory_pool()


@functools.lru_cache(maxsize=1)
def _hook_class():
    """The memory-hook class (made once: it subclasses CuPy's, imported on first use)."""
    from cupy.cuda import memory_hook

    class PeakHook(memory_hook.MemoryHook):
        """Updates the peak of every open scope of this thread at each pool allocation."""

        name = "ds4kern_scope"

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            stack = getattr(_local, "stack", None)
            if not stack:
                return
            used = stack[-1].pool.used_bytes()
            for s in stack:
                s.allocations += 1
                if used > s.peak:
                    s.peak = used

    return PeakHook


class _Scope:
    __slots__ = ("name", "path", "pool", "entry", "peak", "allocations", "t0", "hook", "names")

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path
        self.pool = None
        self.hook = None
        self.allocations = 0

    def _used(self) -> int:
        return int(self.pool.used_bytes()) if self.pool is not None else 0

    def __enter__(self):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        self.names = [s.name for s in stack] + [self.name]
        self.pool = _pool()
        if not stack and self.pool is not None:  # the outermost scope of this thread installs the hook
            self.hook = _hook_class()()
            self.hook.__enter__()
        self.entry = self.peak = self._used()
        _sync()
        self.t0 = time.perf_counter()
        stack.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _sync()
        seconds = time.perf_counter() - self.t0
        stack = _local.stack
        if stack and stack[-1] is self:
            stack.pop()
        exit_bytes = self._used()
        if self.hook is not None:
            self.hook.__exit__(None, None, None)
        rec = dict(name=self.name, path="/".join(self.names), depth=len(self.names) - 1, entry_bytes=self.entry,
                   exit_bytes=exit_bytes, peak_bytes=max(self.peak, exit_bytes), allocations=self.allocations,
                   seconds=round(seconds, 9))
        for outer in stack:  # what this scope saw is also inside every enclosing one
            outer.peak = max(outer.peak, rec["peak_bytes"])
        line = json.dumps(rec) + "\n"
        with _write_lock:
            with open(self.path, "a") as f:
                f.write(line)
        return False


# -- reading the statistics back -----------------------------------------------------------


def read_stats(path) -> list:
    """The records of a scope-statistics file; a line that is not a JSON object of the format
    above raises ValueError naming the line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(rec, dict) or not {"path", "peak_bytes", "entry_bytes"} <= set(rec):
                raise ValueError(f"{path}:{n}: not a scope record (needs path, entry_bytes, peak_bytes)")
            out.append(rec)
    return out


_update()


def summarize(records) -> list:
    """Per scope path: ``dict(path, calls, peak_bytes, peak_above_entry, allocations)``, the
    peak taken over all its exits; sorted by path (enclosing scopes before the ones inside)."""
    by = {}
    for r in records:
        s = by.setdefault(r["path"], dict(path=r["path"], calls=0, peak_bytes=0, peak_above_entry=0, allocations=0))
        s["calls"] += 1
        s["peak_bytes"] = max(s["peak_bytes"], int(r["peak_bytes"]))
        s["peak_above_entry"] = max(s["peak_above_entry"], int(r["peak_bytes"]) - int(r["entry_bytes"]))
        s["allocations"] += int(r.get("allocations", 0))
    return [by[k] for k in sorted(by)]


def format_summary(rows) -> str:
    """A text table of :func:`summarize`'s rows (MiB)."""
    lines = [f"{'scope':48s} {'calls':>7s} {'peak MiB':>10s} {'above entry MiB':>16s} {'allocs':>8s}"]
    for r in rows:
        lines.append(f"{r['path']:48s} {r['calls']:7d} {r['peak_bytes'] / 2**20:10.2f} "
                     f"{r['peak_above_entry'] / 2**20:16.2f} {r['allocations']:8d}")
    return "\n".join(lines)
