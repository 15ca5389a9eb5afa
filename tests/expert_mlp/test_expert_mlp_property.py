"""Property test: on random expert_mlp problems (E, D, I from tiny to a few hundred, row counts with
empty experts, a tail beyond offsets[E], limit on / off, bf16 / float32 out), every CUDA variant
the registry says supports the problem, with every setting, is within the bf16 bar of the float64
oracle, writes every row of every expert and nothing beyond offsets[E].

Examples are derandomised: a failure reproduces from its test id, and hypothesis prints the
falsifying example."""

import numpy as np
import pytest
from em_cases import make_case, oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_expert_mlp_gpu import check, device, run
from test_expert_mlp_gpu import settings as variant_settings

import ds4kern.ops.expert_mlp  # noqa: F401  (registers the op before ds4kern imports it)

pytestmark = pytest.mark.gpu

# multiples of 64 (grouped and naive) and not (naive only)
DIMS = [64, 128, 192, 512, 40, 96]
INTERS = [64, 128, 256, 48]


@st.composite
def problems(draw):
    E = draw(st.integers(1, 24))
    D = draw(st.sampled_from(DIMS))
    I = draw(st.sampled_from(INTERS))
    counts = draw(st.lists(st.one_of(st.just(0), st.integers(1, 9), st.integers(10, 150)), min_size=E, max_size=E))
    tail = draw(st.sampled_from([0, 0, 1, 13]))
    limit = draw(st.sampled_from([10.0, 10.0, 0.75, None]))
    out_dtype = draw(st.sampled_from(["bfloat16", "float32"]))
    gain = draw(st.sampled_from([1.0, 12.0]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return E, D, I, counts, tail, limit, out_dtype, gain, seed


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problems())
def test_property_every_supported_variant(cp, problem):
    E, D, I, counts, tail, limit, out_dtype, gain, seed = problem
    c = make_case(np.random.default_rng(seed), E, D, I, counts, tail=tail, gain=gain)
    d = device(cp, c)
    want = oracle(np, c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], limit)
    pairs = variant_settings(d, limit=limit, out_dtype=out_dtype)
    assert "naive" in {n for n, _ in pairs}
    m = int(c["offsets"][-1])
    for variant, config in pairs:
        got = run(cp, variant, config, d, limit, out_dtype)
        check(got, want, m, f"E={E} D={D} I={I} {counts} tail={tail} limit={limit} {out_dtype} {variant} {config}")
