"""One constant, one place: every Python mirror of a CUDA ``#define`` (warp counts, index-kind
and map-kind tables) equals the value in the folded source its kernels are built from."""

import pytest

import ds4kern  # noqa: F401
from ds4kern.core.kernels import source_define
from ds4kern.locality import recorder
from ds4kern.ops.router import api as router_api
from ds4kern.ops.router import kernels as rk
from ds4kern.ops.router_te import kernels as tk
from ds4kern.ops.topk import kernels as topk

MIRRORS = [
    (rk.WARP, "DS4_WARP_THREADS", rk.WARP_THREADS),
    (rk.ROWS, "DS4_ROWS_WARPS", rk.ROWS_WARPS),
    (rk.ROWS_GROUPED, "DS4_ROWS_WARPS", rk.ROWS_WARPS),
    (tk.DENSE, "DS4_DENSE_WARPS", tk.TE_WARPS),
    (tk.BACKWARD, "DS4_DENSE_WARPS", tk.TE_WARPS),
    (tk.BACKWARD, "DS4_MAP_BYTES", tk.MAP_KIND["bytemap"]),
    (tk.BACKWARD, "DS4_MAP_BITS", tk.MAP_KIND["bitmap"]),
    (tk.BACKWARD, "DS4_MAP_INDICES", tk.MAP_KIND["indices"]),
    (recorder.PREPARE_KERNELS, "DS4_LOC_GP", recorder._GP),
    (recorder.ACCUMULATE_KERNELS, "DS4_LOC_GP", recorder._GP),
    (topk.RADIX, "DS4_TOPK_THREADS", topk.THREADS),
    (topk.SORT, "DS4_TOPK_THREADS", topk.THREADS),
    (topk.RADIX, "DS4_TOPK_MAX_K", topk.MAX_K),
    (topk.RADIX, "DS4_TOPK_BINS", 256),
    (topk.HIST, "DS4_TOPK_HIST_THREADS", topk.HIST_THREADS),
    (topk.HIST, "DS4_TOPK_HIST_PER", topk.HIST_PER),
    (topk.HIST, "DS4_TOPK_HIST_BINS", topk.HIST_BINS),
    (topk.HIST, "DS4_TOPK_HIST_STATE", topk.HIST_STATE),
] + [(rk.NAIVE, f"DS4_IDX_{c}", router_api.IDX_KIND[n])
     for c, n in (("U8", "uint8"), ("U16", "uint16"), ("I16", "int16"), ("I32", "int32"), ("I64", "int64"))]


@pytest.mark.parametrize("family,name,value", MIRRORS, ids=[f"{f.source}:{n}" for f, n, _ in MIRRORS])
def test_python_mirror_equals_cuda_define(family, name, value):
    assert int(source_define(family.source, name)) == value
