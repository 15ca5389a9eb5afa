"""topk_rows' CUDA variants against the reference, on fresh random inputs (exact equality: the
kernels and the reference order the same float32 keys).

Every CUDA variant the registry says supports a problem runs with each of its settings
(``Variant.configs``: radix ``per_thread``, i.e. the chunk size); outputs are poisoned first.
"""

import numpy as np
import pytest
from conftest import supported_variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.ops.topk import reference_topk_rows, topk_rows

pytestmark = pytest.mark.gpu

OP = "topk_rows"
DTYPES = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}


def make_scores(rng, R, C, dtype="float32", kind="normal"):
    if kind == "normal":
        s = rng.standard_normal((R, C))
    elif kind == "ties":  # few distinct values: long runs of equal keys
        s = rng.integers(-3, 4, (R, C)).astype(np.float64)
    elif kind == "equal":
        s = np.full((R, C), 0.5)
    else:  # "special": NaN, infinities, signed zeros, subnormals among normals
        s = rng.standard_normal((R, C))
        m = rng.random((R, C))
        s[m < 0.05] = np.nan
        s[(m >= 0.05) & (m < 0.08)] = np.inf
        s[(m >= 0.08) & (m < 0.11)] = -np.inf
        s[(m >= 0.11) & (m < 0.14)] = -0.0
        s[(m >= 0.14) & (m < 0.17)] = 0.0
        s[(m >= 0.17) & (m < 0.2)] = 1e-40
    return s.astype(DTYPES[dtype])


def settings_for(cp, scores, k, lengths=None):
    args = (cp.asarray(scores), k)
    kw = {} if lengths is None else dict(lengths=cp.asarray(lengths))
    names = supported_variants(OP, *args, **kw)
    d = ds4kern.explain(OP, *args, **kw)
    out = []
    for name in names:
        cfgs = registry.get(OP, name).configs_for(d.problem)
        out += [(name, c) for c in cfgs] if cfgs else [(name, None)]
    return out


def run(cp, variant, config, scores_dev, k, lengths=None, errors=None):
    R = scores_dev.shape[0]
    out = cp.full((R, k), -7, np.int32)  # poison: never a valid answer
    kw = dict(out=out, errors=errors)
    if lengths is not None:
        kw["lengths"] = cp.asarray(lengths)
    call = topk_rows.op.prepare(scores_dev, k, **kw)
    fn = registry.get(OP, variant).fn
    with call.frame.running():
        fn(call.args, **(config or {}))
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(out)


def check_all(cp, scores, k, lengths=None, label="", need=("radix",)):
    want = reference_topk_rows(scores.astype(np.float32), k, lengths)
    dev = cp.asarray(scores)
    pairs = settings_for(cp, scores, k, lengths)
    names = {n for n, _ in pairs}
    assert set(need) <= names, (names, label)
    for variant, config in pairs:
        got = run(cp, variant, config, dev, k, lengths)
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, (f"{label} {variant} {config}: {bad.size} rows differ, first row {bad[0]}: "
                               f"got {got[bad[0], :8]} want {want[bad[0], :8]}")
    return pairs


CASES = [(R, C, k) for R, C, k in [
    (1, 1, 1), (3, 7, 5), (4, 512, 1), (4, 512, 512), (64, 512, 64), (4, 4097, 1024), (4, 8192, 512), (8, 8192, 512),
    (3, 8192, 2048), (2, 65536, 512), (2, 65536, 2048), (64, 8192, 512), (1, 262144, 1), (1, 262144, 1024),
    (5, 16385, 17), (2, 100000, 2048)]]


@pytest.mark.parametrize("R,C,k", CASES, ids=[f"R{r}-C{c}-k{k}" for r, c, k in CASES])
def test_variants_match_reference(cp, rng, R, C, k):
    check_all(cp, make_scores(rng, R, C), k, label=f"R={R} C={C} k={k}")


@pytest.mark.parametrize("kind", ["ties", "equal", "special"])
@pytest.mark.parametrize("C,k", [(8192, 512), (65536, 2048), (3000, 1)])
def test_ties_and_special_values(cp, rng, kind, C, k):
    check_all(cp, make_scores(rng, 3, C, kind=kind), k, label=f"{kind} C={C} k={k}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrow_dtypes(cp, rng, dtype):
    check_all(cp, make_scores(rng, 4, 20000, dtype), 512, label=dtype)
    check_all(cp, make_scores(rng, 4, 5000, dtype, "special"), 100, label=f"{dtype} special")


@pytest.mark.parametrize("C,k", [(8192, 512), (262144, 1024), (700, 2048)])
def test_lengths(cp, rng, C, k):
    R = 6
    lens = np.array([C, 0, 1, min(C, max(k - 1, 0)), min(C, k + 3), C // 3], np.int32)
    check_all(cp, make_scores(rng, R, C), k, lens, label=f"lengths C={C} k={k}")


def test_lengths_out_of_range_are_clamped_and_counted(cp, rng):
    s = make_scores(rng, 4, 3000)
    lens = np.array([3000, -5, 4000, 10], np.int32)
    want = reference_topk_rows(s, 64, np.clip(lens, 0, 3000))
    for variant, config in settings_for(cp, s, 64, np.clip(lens, 0, 3000)):
        errors = cp.zeros(1, np.int32)
        got = run(cp, variant, config, cp.asarray(s), 64, lens, errors)
        np.testing.assert_array_equal(got, want, err_msg=f"{variant} {config}")
        assert int(errors[0]) == 2, (variant, config)


def test_strided_rows(cp, rng):
    wide = cp.asarray(make_scores(rng, 5, 9000))
    view = wide[:, 3:8195]
    want = reference_topk_rows(cp.asnumpy(view), 512)
    for variant, config in settings_for(cp, cp.asnumpy(view), 512):
        got = run(cp, variant, config, view, 512)
        np.testing.assert_array_equal(got, want, err_msg=f"{variant} {config}")


def test_largest_shapes(cp, rng):
    """The spec's largest: R = 8 x 262,144 columns, k in {512, 2048}; R = 1024 prefill rows."""
    s = make_scores(rng, 8, 262144)
    for k in (512, 2048):
        check_all(cp, s, k, label=f"largest k={k}")
    s = make_scores(rng, 1024, 4096)
    lens = rng.integers(0, 4097, 1024).astype(np.int32)
    check_all(cp, s, 512, lens, label="R=1024 C=4096 causal-like lengths")


def test_dispatch_torch_and_empty(cp, rng):
    torch = pytest.importorskip("torch")
    s = make_scores(rng, 4, 8192)
    t = torch.from_numpy(s).cuda()
    got = topk_rows(t, 512)
    assert isinstance(got, torch.Tensor) and got.is_cuda
    np.testing.assert_array_equal(got.cpu().numpy(), reference_topk_rows(s, 512))
    empty = topk_rows(cp.zeros((0, 16), np.float32), 4)
    assert empty.shape == (0, 4)
    none = topk_rows(cp.zeros((3, 0), np.float32), 4)
    assert (cp.asnumpy(none) == -1).all()


@st.composite
def problems(draw):
    R = draw(st.integers(1, 9))
    C = draw(st.one_of(st.integers(1, 3000), st.sampled_from([4096, 8192, 8193, 16384, 40000, 70000])))
    k = draw(st.one_of(st.integers(1, 64), st.sampled_from([256, 512, 1024, 2048])))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    kind = draw(st.sampled_from(["normal", "ties", "special"]))
    with_len = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return R, C, k, dtype, kind, with_len, seed


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problems())
def test_property_every_supported_variant(cp, problem):
    R, C, k, dtype, kind, with_len, seed = problem
    rng = np.random.default_rng(seed)
    s = make_scores(rng, R, C, dtype, kind)
    lens = rng.integers(0, C + 1, R).astype(np.int32) if with_len else None
    pairs = check_all(cp, s, k, lens, label=str(problem), need=())
    assert pairs
