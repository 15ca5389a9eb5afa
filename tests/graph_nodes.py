"""Count the kernel launches of a piece of GPU code: capture it into a CUDA graph on a fresh
stream (driver API through ctypes) and count the graph's kernel nodes."""

import ctypes

CU_STREAM_CAPTURE_MODE_RELAXED = 2
CU_GRAPH_NODE_TYPE_KERNEL = 0


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuStreamBeginCapture_v2", "cuStreamEndCapture", "cuGraphGetNodes", "cuGraphNodeGetType",
                 "cuGraphDestroy"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def count_kernel_nodes(cp, fn) -> int:
    """Number of kernel nodes that ``fn()`` launches on the current CuPy stream."""
    lib = _driver()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()  # warm-up outside the capture (compiles, fills the memory pool)
        s.synchronize()
        rc = lib.cuStreamBeginCapture_v2(ctypes.c_void_p(s.ptr), CU_STREAM_CAPTURE_MODE_RELAXED)
        assert rc == 0, f"cuStreamBeginCapture failed: {rc}"
        try:
            fn()
        finally:
            graph = ctypes.c_void_p()
            rc = lib.cuStreamEndCapture(ctypes.c_void_p(s.ptr), ctypes.byref(graph))
        assert rc == 0, f"cuStreamEndCapture failed: {rc}"
    try:
        n = ctypes.c_size_t(0)
        assert lib.cuGraphGetNodes(graph, None, ctypes.byref(n)) == 0
        nodes = (ctypes.c_void_p * max(1, n.value))()
        assert lib.cuGraphGetNodes(graph, nodes, ctypes.byref(n)) == 0
        kinds = []
        for i in range(n.value):
            t = ctypes.c_int()
            assert lib.cuGraphNodeGetType(ctypes.c_void_p(nodes[i]), ctypes.byref(t)) == 0
            kinds.append(t.value)
        return sum(1 for t in kinds if t == CU_GRAPH_NODE_TYPE_KERNEL)
    finally:
        lib.cuGraphDestroy(graph)
