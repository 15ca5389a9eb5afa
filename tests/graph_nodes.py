"""Count the kernel launches of a piece of GPU code: capture it into a CUDA graph on a fresh
stream (driver API, :class:`ds4kern.core.timing.CapturedGraph`) and count the graph's kernel nodes."""

from ds4kern.core.timing import CapturedGraph


def count_kernel_nodes(cp, fn) -> int:
    """Number of kernel nodes that ``fn()`` launches on the current CuPy stream."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()  # warm-up outside the capture (compiles, fills the memory pool)
        s.synchronize()
    with CapturedGraph(fn) as g:
        return g.kernel_nodes
