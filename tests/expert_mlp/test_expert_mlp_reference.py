"""expert_mlp on the host: the numpy reference against an independent float64 formulation
(row by row, weights gathered per row), argument validation naming the argument, the problem
facts and what the GPU variants' ``supports`` make of them, the grid bound and the Python mirrors
of the kernels' constants."""

import numpy as np
import pytest
from em_cases import make_case, offsets_of, oracle, oracle_rows, random_counts, rel_err

import ds4kern
import ds4kern.ops.expert_mlp  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.kernels import source_define
from ds4kern.ops.expert_mlp import (ExpertMlpProblem, expert_mlp, item_bound, reference_expert_mlp, swiglu)
from ds4kern.ops.expert_mlp import kernels as K
from ds4kern.ops.expert_mlp import variants as V
from ds4kern.ops.expert_mlp.rule import rule

OP = "expert_mlp"
E, D, I = 5, 64, 128


def args(c):
    return c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"]


# -- the reference against the float64 oracle ----------------------------------------------------


@pytest.mark.parametrize("limit", [10.0, 0.5, None, 0])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_reference_matches_float64(rng, limit, out_dtype):
    counts = [0, 40, 3, 0, 11]  # empty experts, one with many rows
    c = make_case(rng, E, D, I, counts, gain=4.0)
    want = oracle_rows(*args(c), limit)
    got = expert_mlp(*args(c), limit=limit, out_dtype=out_dtype)
    assert got.dtype == (BFLOAT16 if out_dtype == "bfloat16" else np.float32)
    assert got.shape == (c["x"].shape[0], D)
    err = rel_err(got, want)
    # float32 sums of exact products; h rounds to bf16 as in the oracle (a few elements may round
    # the other way), out to bf16 (2^-9 relative) or not at all
    assert err < (5e-3 if out_dtype == "bfloat16" else 1e-3), err
    assert not np.isnan(np.asarray(got, np.float64)).any()


def test_two_oracles_agree(rng):
    c = make_case(rng, E, D, I, random_counts(rng, E, 50))
    a = oracle_rows(*args(c), 10.0)
    b = oracle(np, *args(c), 10.0)
    assert rel_err(a, b) < 1e-12


def test_clamp_matters_and_follows_the_public_code(rng):
    """With large activations the clamp changes the result; gate only from above, up both ways."""
    c = make_case(rng, E, D, I, [7, 0, 9, 30, 1], gain=16.0)
    clamped = expert_mlp(*args(c), limit=10.0, out_dtype="float32")
    free = expert_mlp(*args(c), limit=None, out_dtype="float32")
    assert rel_err(clamped, oracle_rows(*args(c), 10.0)) < 1e-3
    assert rel_err(free, oracle_rows(*args(c), 0)) < 1e-3
    assert rel_err(clamped, free.astype(np.float64)) > 0.05
    g = np.array([-50.0, -20.0, 5.0, 20.0, np.nan], np.float32)
    u = np.array([-20.0, 20.0, 3.0, -20.0, 1.0], np.float32)
    h = swiglu(g, u, 10.0)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(h[:4], [silu(-50.0) * -10, silu(-20.0) * 10, silu(5.0) * 3, silu(10.0) * -10],
                               rtol=1e-6)
    assert np.isnan(h[4])  # NaN propagates through the clamp


def test_rows_beyond_offsets_are_left_alone(rng):
    c = make_case(rng, E, D, I, [2, 0, 5, 1, 0], tail=6)
    out = np.full((c["x"].shape[0], D), 7.0, np.float32)
    got = expert_mlp(*args(c), out=out)
    assert got is out
    assert (out[8:] == 7.0).all()
    assert rel_err(out[:8], oracle_rows(*args(c), 10.0)) < 1e-3
    default = expert_mlp(*args(c))
    assert (np.asarray(default[8:], np.float32) == 0).all()


def test_out_may_be_x(rng):
    c = make_case(rng, 3, D, I, [4, 0, 6])
    want = expert_mlp(*args(c))
    x = c["x"].copy()
    got = expert_mlp(x, c["offsets"], c["w_gate"], c["w_up"], c["w_down"], out=x)
    assert got is x
    np.testing.assert_array_equal(x.view(np.uint16), want.view(np.uint16))


def test_empty_and_single_expert(rng):
    c = make_case(rng, 1, D, I, [0], tail=3)
    got = expert_mlp(*args(c))
    assert got.shape == (3, D) and (np.asarray(got, np.float32) == 0).all()
    c = make_case(rng, 1, D, I, [9])  # the shared expert: one expert, every row
    assert rel_err(expert_mlp(*args(c), out_dtype="float32"), oracle_rows(*args(c), 10.0)) < 1e-3
    z = expert_mlp(np.zeros((0, D), BFLOAT16), np.zeros(2, np.int32), c["w_gate"], c["w_up"], c["w_down"])
    assert z.shape == (0, D)


def test_int64_offsets_and_explain(rng):
    c = make_case(rng, E, D, I, [1, 2, 3, 4, 5])
    a = expert_mlp(*args(c))
    b = expert_mlp(c["x"], c["offsets"].astype(np.int64), c["w_gate"], c["w_up"], c["w_down"])
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    d = ds4kern.explain(OP, *args(c))
    assert d.chosen.name == "reference" and d.how == "rule"
    p = d.problem
    assert (p.experts, p.dim, p.inter, p.out_dtype, p.clamp, p.rows_bucket) == (E, D, I, "bfloat16", True, 16)


# -- validation ----------------------------------------------------------------------------------


def _bad(c, **over):
    a = dict(x=c["x"], offsets=c["offsets"], w_gate=c["w_gate"], w_up=c["w_up"], w_down=c["w_down"])
    kw = {k: over.pop(k) for k in list(over) if k in ("limit", "out_dtype", "out")}
    a.update(over)
    return lambda: expert_mlp(a["x"], a["offsets"], a["w_gate"], a["w_up"], a["w_down"], **kw)


@pytest.mark.parametrize("over,exc,words", [
    (lambda c: dict(x=c["x"].astype(np.float32)), TypeError, "x must be bfloat16"),
    (lambda c: dict(x=c["x"][None]), ValueError, "x must have shape"),
    (lambda c: dict(w_gate=c["w_gate"].astype(np.float32)), TypeError, "w_gate must be bfloat16"),
    (lambda c: dict(w_gate=c["w_gate"][:, :, :32]), ValueError, "w_gate"),
    (lambda c: dict(w_up=c["w_up"][:4]), ValueError, "w_up must have shape"),
    (lambda c: dict(w_up=c["w_up"][:, :64]), ValueError, "w_up must have shape"),
    (lambda c: dict(w_down=np.swapaxes(c["w_down"], 1, 2)), ValueError, "w_down must have shape"),
    (lambda c: dict(w_down=c["w_down"].astype(np.float16)), TypeError, "w_down must be bfloat16"),
    (lambda c: dict(offsets=c["offsets"][:-1]), ValueError, "offsets must have shape"),
    (lambda c: dict(offsets=c["offsets"].astype(np.float32)), TypeError, "offsets must be int32"),
    (lambda c: dict(offsets=np.array([0, 5, 3, 8, 9, 12], np.int32)), ValueError, "non-decreasing"),
    (lambda c: dict(offsets=np.array([1, 5, 6, 8, 9, 12], np.int32)), ValueError, "offsets[0] must be 0"),
    (lambda c: dict(offsets=np.array([0, 5, 6, 8, 9, 99], np.int32)), ValueError, "offsets[E]"),
    (lambda c: dict(limit=-1.0), ValueError, "limit"),
    (lambda c: dict(limit=float("nan")), ValueError, "limit"),
    (lambda c: dict(limit=True), TypeError, "limit"),
    (lambda c: dict(limit="10"), TypeError, "limit"),
    (lambda c: dict(out_dtype="float16"), TypeError, "out_dtype"),
    (lambda c: dict(out=np.zeros((12, D), np.float16)), TypeError, "out must be"),
    (lambda c: dict(out=np.zeros((12, D), np.float32), out_dtype="bfloat16"), TypeError, "out must be bfloat16"),
    (lambda c: dict(out=np.zeros((11, D), np.float32)), ValueError, "out must have shape"),
    (lambda c: dict(out=np.zeros((D, 12), np.float32).T), ValueError, "C-contiguous"),
    (lambda c: dict(out=c["w_down"].reshape(-1)[:12 * D].reshape(12, D)), ValueError, "out overlaps w_down"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validation_names_the_argument(rng, over, exc, words):
    c = make_case(rng, E, D, I, [3, 2, 3, 1, 3])
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        _bad(c, **over(c))()


def test_read_only_out_refused(rng):
    c = make_case(rng, E, D, I, [3, 2, 3, 1, 3])
    out = np.zeros((12, D), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        expert_mlp(*args(c), out=out)


def test_numpy_scalars_for_limit(rng):
    c = make_case(rng, E, D, I, [3, 2, 3, 1, 3])
    a = expert_mlp(*args(c), limit=np.float32(10.0))
    b = expert_mlp(*args(c), limit=10)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


# -- problems, supports, configs, rule -------------------------------------------------------------


def problem(**kw):
    base = dict(backend="cuda", rows_bucket=512, experts=256, dim=4096, inter=2048, out_dtype="bfloat16", clamp=True,
                aligned16=True, weights_contiguous=True, smem_per_block=232448, sm_count=132, cc=90)
    base.update(kw)
    return ExpertMlpProblem(**base)


@pytest.mark.parametrize("kw,words", [
    (dict(dim=4096 + 32), "multiples of 64"),
    (dict(inter=96), "multiples of 64"),
    (dict(experts=2048), "at most 1024"),
    (dict(weights_contiguous=False), "C-contiguous"),
    (dict(aligned16=False), "16-byte"),
    (dict(cc=75), "sm_80"),
    (dict(smem_per_block=16384), "shared memory"),
])
def test_grouped_rejects_with_a_reason(kw, words):
    reason = V._grouped_supports(problem(**kw))
    assert reason is not None and words in reason


def test_grouped_accepts_model_sizes_and_configs():
    for kw in (dict(), dict(experts=384, dim=7168, inter=3072), dict(rows_bucket=131072),
               dict(experts=1, rows_bucket=64), dict(out_dtype="float32")):
        p = problem(**kw)
        assert V._grouped_supports(p) is None, kw
        cfgs = V._grouped_configs(p)
        assert sorted(c["tokens_per_group"] for c in cfgs) == list(K.TOKEN_GROUPS)
    # decode at Flash sizes: groups of 8; prefill: 64; one expert (shared) with 64 rows: small
    # groups, so its 32..64 tiles become enough blocks
    assert V._grouped_configs(problem(rows_bucket=512))[0] == {"tokens_per_group": 8}
    assert V._grouped_configs(problem(rows_bucket=2048))[0] == {"tokens_per_group": 8}
    assert V._grouped_configs(problem(rows_bucket=131072))[0] == {"tokens_per_group": 64}
    assert V._grouped_configs(problem(experts=1, rows_bucket=64))[0]["tokens_per_group"] < 64
    # 48 kB without opt-in: the groups whose stages fit
    fits = [c["tokens_per_group"] for c in V._grouped_configs(problem(smem_per_block=49152))]
    assert fits and all(K.grouped_smem(t) <= 49152 for t in fits)


def test_rule():
    assert rule(problem(backend="numpy"), frozenset({"reference"}))[0] == "reference"
    assert rule(problem(), frozenset({"naive", "grouped"}))[0] == "grouped"
    assert rule(problem(dim=96), frozenset({"naive"}))[0] == "naive"


def test_problem_str_and_bucket():
    p = problem(aligned16=False, weights_contiguous=False)
    assert "strided weights" in str(p) and "not 16-byte aligned" in str(p)
    assert p.bucket == (512, 256, 4096, 2048, "bfloat16", False, False)


def test_item_bound_covers_every_valid_offsets(rng):
    """The grid of a launch (``item_bound``) is never below the items the kernels enumerate."""
    for _ in range(300):
        E_ = int(rng.integers(1, 40))
        N = int(rng.integers(0, 300))
        tn = int(rng.choice(K.TOKEN_GROUPS))
        cuts = np.sort(rng.integers(0, N + 1, E_ - 1)) if E_ > 1 else np.zeros(0, np.int64)
        m = int(rng.integers(0, N + 1))  # offsets[E] <= N
        cuts = np.minimum(cuts, m)
        o = np.concatenate([[0], cuts, [m]]).astype(np.int64)
        items = sum(-(-int(n) // tn) for n in np.diff(o))
        assert items <= item_bound(N, E_, tn, 1), (E_, N, tn, o)
    assert item_bound(6, 256, 8, 64) == 6 * 64  # B = 1 x top-6: exactly the items


def test_python_mirrors_equal_cuda_defines():
    src = K.GROUPED.source
    for name, value in [("DS4_EM_THREADS", K.THREADS), ("DS4_EM_TILE_ROWS", K.TILE_ROWS), ("DS4_EM_BK", K.BK),
                        ("DS4_EM_STAGES", K.STAGES), ("DS4_EM_GU_FEATURES", K.GU_FEATURES),
                        ("DS4_EM_MAX_EXPERTS", K.MAX_EXPERTS), ("DS4_EM_NAIVE_THREADS", K.NAIVE_THREADS)]:
        assert int(source_define(src, name)) == value, name
    assert K.MAX_EXPERTS == 8 * K.THREADS  # the item search holds at most 8 experts per thread


def test_reference_module_function(rng):
    c = make_case(rng, E, D, I, [0, 4, 0, 2, 1])
    out = reference_expert_mlp(*args(c), limit=10.0, out_dtype=np.float32)
    assert rel_err(out, oracle_rows(*args(c), 10.0)) < 1e-3
    assert offsets_of([1, 2]).tolist() == [0, 1, 3]
