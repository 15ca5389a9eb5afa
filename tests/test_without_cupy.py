"""Without CuPy, the tools that need a GPU say what they need and how to install it, as the ops
do for GPU arrays; argument errors still come first."""

import importlib.util

import numpy as np
import pytest

import ds4kern
from ds4kern.replay import RoutingCapture

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")

INSTALL = r"install ds4kern\[cuda12\] or ds4kern\[cuda13\]"


@pytest.mark.parametrize("make,what", [
    (lambda: RoutingCapture(max_tokens=8, num_layers=2, topk=2, num_experts=16), "RoutingCapture"),
    (lambda: ds4kern.LocalityRecorder(num_layers=2, num_experts=16, topk=2), "LocalityRecorder"),
    (lambda: ds4kern.rope_table(16, device=True), r"rope_table\(device=True\)"),
])
def test_gpu_tools_name_what_they_need(make, what):
    with pytest.raises(ImportError, match=rf"{what}.* needs a CUDA GPU and CuPy.*{INSTALL}"):
        make()


def test_ops_give_the_same_advice():
    class DeviceArray:  # any __cuda_array_interface__ object is a GPU array
        __cuda_array_interface__ = {"shape": (2, 8), "typestr": "<f4", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match=rf"logits is a GPU array.*{INSTALL}"):
        ds4kern.router_topk(DeviceArray(), 2)


def test_argument_errors_come_first():
    with pytest.raises(ValueError, match="max_tokens"):
        RoutingCapture(max_tokens=0, num_layers=2, topk=2, num_experts=16)
    with pytest.raises(ValueError, match="hash_layers"):
        ds4kern.LocalityRecorder(num_layers=2, num_experts=16, topk=2, hash_layers=(2,))
    with pytest.raises(ValueError, match="max_pos"):
        ds4kern.rope_table(0)
    assert ds4kern.rope_table(4)[0].shape == (4, 32) and isinstance(ds4kern.rope_table(4)[0], np.ndarray)
