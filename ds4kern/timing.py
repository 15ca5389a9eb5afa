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
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / inner)
    return statistics.median(times)
