"""Property test: on random MoE problems (T from decode to prefill, k, E up to 1024, -1 and skewed
routing, x's dtype and layout), every CUDA variant the registry says supports the problem equals
the reference exactly: the permutation, x_perm's rows, and the combine of random expert outputs.

Examples are derandomised: a failure reproduces from its test id, and hypothesis prints the
falsifying example."""

import numpy as np
import pytest
from conftest import supported_variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moe_cases import DTYPES, make_indices, make_rows
from test_moe_gpu import check_permute, check_unpermute

import ds4kern.ops.moe  # noqa: F401  (registers the ops)
from ds4kern.ops.moe import moe_permute

pytestmark = pytest.mark.gpu


@st.composite
def problems(draw):
    T = draw(st.one_of(st.integers(1, 300), st.sampled_from([1024, 1537, 4096, 9000, 16384])))
    k = draw(st.sampled_from([1, 2, 6, 8, 9]))
    E = draw(st.one_of(st.integers(1, 1024), st.sampled_from([8, 64, 256, 384, 1024])))
    skip = draw(st.sampled_from([0.0, 0.05, 0.5]))
    kind = draw(st.sampled_from(["random", "random", "hot", "one"]))
    D = draw(st.sampled_from([0, 1, 3, 8, 64, 100, 512]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    layout = draw(st.sampled_from(["contiguous", "strided", "offset"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return T, k, E, skip, kind, D, dtype, layout, seed


def layout_rows(cp, host, layout):
    T, D = host.shape
    if layout == "contiguous" or D == 0:
        return cp.asarray(host)
    wide = cp.zeros((2 * T + 1, D + 8), host.dtype)
    if layout == "strided":
        view = wide[::2, 8:8 + D][:T]
    else:
        view = wide[1:T + 1, 1:1 + D]
    view[...] = cp.asarray(host)
    return view


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problems())
def test_property_every_supported_variant(cp, problem):
    T, k, E, skip, kind, D, dtype, layout, seed = problem
    rng = np.random.default_rng(seed)
    idx = make_indices(rng, T, k, E, skip, kind=kind)
    x = make_rows(rng, T, D, dtype) if D else None
    x_dev = None if x is None else layout_rows(cp, x, layout)
    label = f"T={T} k={k} E={E} skip={skip} {kind} D={D} {dtype} {layout}"
    names = check_permute(cp, idx, E, x, x_dev, label=label)
    assert names, label
    if D:
        perm = moe_permute(cp.asarray(idx), E)
        y = layout_rows(cp, make_rows(rng, T * k, D, dtype), layout)
        w = rng.random((T, k)).astype(np.float32)
        check_unpermute(cp, y, perm, w, label=label)
        assert supported_variants("moe_unpermute", y, perm, cp.asarray(w))
