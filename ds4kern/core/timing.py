"""GPU timing with CUDA events: warm-up, many runs, median; and the copy bandwidth."""

from __future__ import annotations

import statistics


def cuda_time(fn, warmup: int = 10, repeat: int = 100, setup=None) -> float:
    """Median seconds of ``fn()`` between CUDA events on the current stream.

    ``setup(i)``, if given, runs before run i outside the timed region (e.g. to rotate inputs).
    """
    import cupy as cp

    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for i in range(repeat):
        if setup:
            setup(i)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(times)


def device_name() -> str:
    """Name of the current CUDA device (what every benchmark prints next to its numbers)."""
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    return name.decode() if isinstance(name, bytes) else name


def host_time(fn, n: int = 200) -> float:
    """Seconds of host time per ``fn()`` over ``n`` back-to-back calls with no synchronisation
    inside (validation, dispatch and launch cost; the GPU is synchronised before and after)."""
    import time

    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    cp.cuda.Device().synchronize()
    return t


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    import cupy as cp

    a = cp.random.random(nbytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    t = cuda_time(lambda: cp.copyto(b, a), warmup=3, repeat=20)
    return 2 * a.nbytes / t


def cuda_graph_time(fn, inner: int = 20, repeat: int = 50) -> float:
    """Median seconds per call of ``fn(j)`` replayed from a CUDA graph of ``inner`` calls.

    Removes the host's launch cost: what is left is the device time of the work (with the small
    gaps between graph nodes).  ``fn(j)`` may use ``j`` to rotate inputs.
    """
    import cupy as cp

    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for j in range(inner):  # warm-up: compiles, fills the memory pool
            fn(j)
        s.synchronize()
        s.begin_capture()
        for j in range(inner):
            fn(j)
        g = s.end_capture()
        for _ in range(3):
            g.launch(s)
        s.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(repeat):
            start.record(s)
            g.launch(s)
            stop.record(s)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3 / inner)
    return statistics.median(times)


def torch_time(fn, warmup: int = 3, repeat: int = 30, setup=None) -> float:
    """As :func:`cuda_time`, for torch code: median seconds of ``fn()`` between torch CUDA events
    on torch's current stream (``setup(i)`` runs before run i, outside the timed region)."""
    import torch

    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        if setup:
            setup(i)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def torch_graph_time(fn, inner: int = 20, repeat: int = 50) -> float:
    """As :func:`cuda_graph_time`, for torch code (captured with ``torch.cuda.graph``)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for j in range(inner):
            fn(j)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(inner):
            fn(j)
    return torch_time(g.replay, warmup=3, repeat=repeat) / inner


# -- device time of a captured graph (driver API through ctypes) ---------------------------
# Used by autotune: timing a few-microsecond kernel with events around a Python call measures
# the host's launch cost, not the kernel.  Capturing the calls into a graph and replaying it
# leaves only device time.

_CAPTURE_RELAXED = 2
_NODE_KERNEL = 0


def _driver():
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuStreamBeginCapture_v2", "cuStreamEndCapture", "cuGraphGetNodes", "cuGraphNodeGetType",
                 "cuGraphDestroy", "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphExecDestroy"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


class CapturedGraph:
    """``fn()`` captured (relaxed mode) on a fresh non-blocking CuPy stream; ``kernel_nodes``
    counts its kernel launches.  Use as a context manager (frees the graph)."""

    def __init__(self, fn):
        import ctypes

        import cupy as cp

        self._c = ctypes
        self.lib = _driver()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph = ctypes.c_void_p()
        self.exec = None
        s = self.stream
        with s:
            rc = self.lib.cuStreamBeginCapture_v2(ctypes.c_void_p(s.ptr), _CAPTURE_RELAXED)
            if rc != 0:
                raise RuntimeError(f"cuStreamBeginCapture failed ({rc})")
            try:
                fn()
            finally:
                rc = self.lib.cuStreamEndCapture(ctypes.c_void_p(s.ptr), ctypes.byref(self.graph))
            if rc != 0:
                raise RuntimeError(f"cuStreamEndCapture failed ({rc}): the captured code did something a "
                                   "graph cannot hold")
        n = ctypes.c_size_t(0)
        self.lib.cuGraphGetNodes(self.graph, None, ctypes.byref(n))
        nodes = (ctypes.c_void_p * max(1, n.value))()
        self.lib.cuGraphGetNodes(self.graph, nodes, ctypes.byref(n))
        kinds = []
        for i in range(n.value):
            t = ctypes.c_int()
            self.lib.cuGraphNodeGetType(ctypes.c_void_p(nodes[i]), ctypes.byref(t))
            kinds.append(t.value)
        self.kernel_nodes = sum(1 for t in kinds if t == _NODE_KERNEL)

    def launch(self):
        c = self._c
        if self.exec is None:
            self.exec = c.c_void_p()
            rc = self.lib.cuGraphInstantiateWithFlags(c.byref(self.exec), self.graph, c.c_ulonglong(0))
            if rc != 0:
                self.exec = None
                raise RuntimeError(f"cuGraphInstantiate failed ({rc})")
        rc = self.lib.cuGraphLaunch(self.exec, c.c_void_p(self.stream.ptr))
        if rc != 0:
            raise RuntimeError(f"cuGraphLaunch failed ({rc})")

    def close(self):
        if self.exec is not None:
            self.lib.cuGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph:
            self.lib.cuGraphDestroy(self.graph)
            self.graph = self._c.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def graph_device_time(fn, repeat: int = 10, inner: int = 10) -> float:
    """Median device seconds per ``fn()``, from replays of a graph of ``inner`` calls.

    Raises ``RuntimeError`` when ``fn`` cannot be captured or launched no kernel on the current
    stream (e.g. it switches streams): callers fall back to event timing.
    """
    import cupy as cp

    def body():
        for _ in range(inner):
            fn()

    with CapturedGraph(body) as g:
        if g.kernel_nodes < inner:
            raise RuntimeError(f"captured {g.kernel_nodes} kernels for {inner} calls")
        s = g.stream
        g.launch()
        s.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(repeat):
            start.record(s)
            g.launch()
            stop.record(s)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3 / inner)
    return statistics.median(times)
