"""Property test: on random hyper-connection problems (B, D from tiny to the model's, stream and
output dtypes, layouts of X), every CUDA variant the registry says supports the problem, with
every setting, equals the float64 reference.

Examples are derandomised: a failure reproduces from its test id, and hypothesis prints the
falsifying example."""

import numpy as np
import pytest
from hc_cases import DTYPES, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hc_gpu import (check_mix, check_new, device, device_streams, poisoned, pre_of_stored, pre_outs, run)
from test_hc_gpu import settings as variant_settings

import ds4kern.ops.hyper_connections  # noqa: F401  (registers the ops before ds4kern imports them)
from ds4kern.ops.hyper_connections import reference_hc_post, reference_hc_pre

pytestmark = pytest.mark.gpu

# multiples of 4 (4-channel kernels) and not (scalar kernels), up to both model widths
DIMS = [1, 3, 4, 8, 36, 64, 100, 256, 260, 1000, 4096, 7168]


@st.composite
def problems(draw):
    D = draw(st.sampled_from(DIMS))
    B = draw(st.one_of(st.integers(1, 300), st.sampled_from([1024, 2049, 4096] if D <= 4096 else [1024])))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    y_dtype = draw(st.sampled_from(sorted(DTYPES)))
    layout = draw(st.sampled_from(["contiguous", "padded", "offset", "transposed"]))
    op = draw(st.sampled_from(["hc_pre", "hc_post_pre"]))
    scale_on_device = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return D, B, dtype, y_dtype, layout, op, scale_on_device, seed


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problems())
def test_property_every_supported_variant(cp, problem):
    D, B, dtype, y_dtype, layout, op, scale_on_device, seed = problem
    rng = np.random.default_rng(seed)
    inp = make_inputs(rng, B, D, dtype, y_dtype)
    dv = device(cp, inp, scale_on_device)
    Xd = device_streams(cp, inp["X"], layout)
    mix = (dv["hc_fn"], dv["hc_scale"], dv["hc_base"])
    label = f"{op} B={B} D={D} {dtype} y {y_dtype} {layout}"
    if op == "hc_pre":
        want = reference_hc_pre(inp["X"], inp["hc_fn"], inp["hc_scale"], inp["hc_base"])
        args = (Xd,) + mix
    else:
        new = reference_hc_post(inp["y"], inp["X"], inp["post"], inp["comb"])
        args = (dv["y"], Xd, dv["post"], dv["comb"]) + mix
    pairs = variant_settings(op, *args)
    assert pairs
    for variant, config in pairs:
        outs = pre_outs(cp, B, D)
        if op == "hc_pre":
            run(op, variant, config, *args, out=outs)
            got = tuple(cp.asnumpy(o) for o in outs)
            mixed = inp["X"]
        else:
            outs = (poisoned(cp, (B, 4, D), DTYPES[dtype]),) + outs
            run(op, variant, config, *args, out=outs)
            got = tuple(cp.asnumpy(o) for o in outs)
            check_new(got[0], new, dtype, f"{label} {variant} {config}: X_new")
            want = pre_of_stored(got[0], inp)
            mixed, got = got[0], got[1:]
        check_mix(got, want, mixed, f"{label} {variant} {config}")
