"""pytest-benchmark comparison of router_topk variants and peers (GPU only).

    python -m pytest bench/ --benchmark-only

pytest-benchmark's own numbers are the host-side cost of one call (no synchronisation); the
kernel time, measured with CUDA events, and the fraction of copy bandwidth are in each
benchmark's extra_info (``--benchmark-json`` keeps them).  ``bench/router/router_bench.py`` prints the
same measurements as a table.
"""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError
except Exception:
    pytest.skip("no CUDA device", allow_module_level=True)

import ds4kern  # noqa: E402
from ds4kern.core.arrays import BFLOAT16  # noqa: E402
from ds4kern.core.timing import copy_bandwidth, cuda_time  # noqa: E402

import router_bench as rb  # noqa: E402

BW = None


def _bw():
    global BW
    if BW is None:
        BW = copy_bandwidth()
    return BW


IMPLS = [v.name for v in ds4kern.variants("router_topk") if v.backend == "cuda"] + list(rb.torch_peers())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 128, 4096, 65536])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_router_topk(benchmark, impl, T, dtype):
    benchmark.group = f"router_topk E=256 k=6 {dtype} T={T}"
    dt = {"float32": np.float32, "bfloat16": BFLOAT16}[dtype]
    rng = np.random.default_rng()
    x = cp.asarray(rng.standard_normal((T, rb.E), dtype=np.float32).astype(dt))
    bias = cp.asarray((0.1 * rng.standard_normal(rb.E)).astype(np.float32))
    if impl.startswith("torch"):
        import torch

        fn = rb.torch_peers()[impl]
        xt, bt = torch.from_dlpack(x), torch.from_dlpack(bias)
        call = lambda: fn(xt, bt)  # noqa: E731
    else:
        w, i = cp.empty((T, rb.K), cp.float32), cp.empty((T, rb.K), cp.int32)
        call = lambda: ds4kern.router_topk(x, rb.K, score_function="sqrtsoftplus", expert_bias=bias,  # noqa: E731
                                           scaling_factor=rb.SCALING, out=(w, i), variant=impl)
    t = cuda_time(call, warmup=10, repeat=100)
    nbytes = rb.minimal_bytes(T, np.dtype(dt).itemsize)
    benchmark.extra_info.update(impl=impl, T=T, dtype=dtype, gpu_us=t * 1e6,
                                pct_copy=100 * nbytes / t / _bw(), minimal_bytes=nbytes)
    benchmark(call)
    cp.cuda.Device().synchronize()
