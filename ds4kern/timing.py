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
