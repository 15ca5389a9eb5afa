"""Dispatcher precedence (explicit > context > environment > heuristic), buckets, explain."""

import numpy as np
import pytest

import ds4kern
from ds4kern.ops.router import _bucket_tokens
from ds4kern.registry import Variant

X = np.ones((5, 16), np.float32)


class Cheap:
    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        def fill(value):
            def fn(a):
                a.weights[...] = value
                a.indices[...] = 0
            return fn

        register(Variant("router_topk", "cheap", "numpy", fill(1.0), cost=0.1))
        register(Variant("router_topk", "picky", "numpy", fill(2.0), cost=5.0,
                         supports=lambda p: None if p.num_experts == 16 else "only E=16"))


@pytest.fixture
def cheap(clean_overrides):
    name = ds4kern.register_plugin(Cheap(), name="cheap_plugin")
    yield
    ds4kern.unregister_plugin(name)


def weight(**kw):
    return float(ds4kern.router_topk(X, 2, **kw)[0][0, 0])


def test_heuristic_takes_lowest_cost(cheap):
    assert weight() == 1.0
    d = ds4kern.explain("router_topk", X, 2)
    assert d.chosen.name == "cheap" and d.how == "heuristic"


def test_explicit_beats_everything(cheap, monkeypatch):
    monkeypatch.setenv("DS4KERN_VARIANT", "router_topk=picky")
    with ds4kern.use_variant("router_topk", "cheap"):
        assert weight(variant="reference") != 1.0
        assert ds4kern.explain("router_topk", X, 2, variant="reference").how == "explicit"


def test_context_beats_env_and_env_beats_heuristic(cheap, monkeypatch):
    monkeypatch.setenv("DS4KERN_VARIANT", "router_topk=picky")
    assert weight() == 2.0
    d = ds4kern.explain("router_topk", X, 2)
    assert d.how == "override" and "DS4KERN_VARIANT" in d.why
    with ds4kern.use_variant({"router_topk": "cheap"}):
        assert weight() == 1.0
        with ds4kern.use_variant("router_topk", "reference"):
            assert weight() not in (1.0, 2.0)
        assert weight() == 1.0
    assert weight() == 2.0


def test_override_that_cannot_run_is_ignored_and_explained(cheap):
    x = np.ones((5, 17), np.float32)
    with ds4kern.use_variant("router_topk", "picky"):
        d = ds4kern.explain("router_topk", x, 2)
        assert d.chosen.name == "cheap"
        assert any("picky" in n and "only E=16" in n for n in d.notes)
        with ds4kern.use_variant("router_topk", "naive"):  # cuda variant, numpy arrays
            d = ds4kern.explain("router_topk", x, 2)
            assert any("naive" in n and "backend" in n for n in d.notes)


def test_explicit_unsupported_raises_with_reason(cheap):
    with pytest.raises(ValueError, match="only E=16"):
        ds4kern.router_topk(np.ones((5, 17), np.float32), 2, variant="picky")
    with pytest.raises(ValueError, match="not a registered variant"):
        ds4kern.router_topk(X, 2, variant="nonexistent")


def test_bad_env_and_bad_context():
    with pytest.raises(TypeError):
        with ds4kern.use_variant("router_topk"):
            pass
    import os
    os.environ["DS4KERN_VARIANT"] = "naive"
    try:
        with pytest.raises(ValueError, match="op=variant"):
            ds4kern.router_topk(X, 2)
    finally:
        del os.environ["DS4KERN_VARIANT"]


def test_explain_lists_every_candidate_with_reasons(clean_overrides):
    d = ds4kern.explain("router_topk", X, 2, score_function="sigmoid")
    text = str(d)
    for v in ds4kern.variants("router_topk"):
        assert v.name in text
    assert "naive" in text and "rejected: backend 'cuda'" in text
    assert "chosen: reference" in text
    assert "bucket" in text
    with pytest.raises(ValueError, match="unknown op"):
        ds4kern.explain("no_such_op", X, 2)


def test_buckets():
    assert [_bucket_tokens(t) for t in (0, 1, 2, 3, 4, 5, 7, 100, 128, 129, 192, 193, 12288, 12289, 65536)] == \
        [0, 1, 2, 3, 4, 6, 8, 128, 128, 192, 192, 256, 12288, 16384, 65536]
    edges = sorted({1 << n for n in range(2, 14)} | {3 << n for n in range(12)})  # 3, 4, 6, 8, 12, ...
    for t in range(3, 5000):  # each bucket: the smallest edge (a power of two or 3/4 of one) >= t
        assert _bucket_tokens(t) == next(e for e in edges if e >= t), t
    a = ds4kern.explain("router_topk", np.ones((100, 16), np.float32), 2).problem
    b = ds4kern.explain("router_topk", np.ones((120, 16), np.float32), 2).problem
    assert a == b and a.bucket == b.bucket


def test_router_static_rule_threshold_vs_naive():
    """The measured rule: threshold from 4096 tokens (bucketed) up, naive below."""
    from ds4kern.ops.router import RouterProblem, _threshold_cost

    def p(t):
        return RouterProblem("cuda", t, 256, 6, "float32", "int32", "sqrtsoftplus", False, True)

    assert _threshold_cost(p(4096)) < 1.0 < _threshold_cost(p(2048))
    assert _threshold_cost(p(65536)) < 1.0 < _threshold_cost(p(1))


def test_router_static_rule_between_cuda_variants():
    """The measured rule (bench/NOTES.md): rows above 12288 tokens where it
    applies (group-limited routing included), screened for E <= 512 and k < 32 otherwise, grouped
    for group-limited routing on whole lanes, threshold from 4096 tokens for 512 < E <= 1024,
    naive below that, radix from k = 32 (or k >= 16 above E = 1024) and beyond E = 3072.
    Decided without a GPU."""
    from ds4kern import dispatch
    from ds4kern.ops.router import OP, RouterProblem

    def chosen(T, E, k, groups=0, gt=4, dtype="float32", sf="sigmoid"):
        p = RouterProblem("cuda", T, E, k, dtype, "int32", sf, False, True, groups, gt if groups else 0)
        return dispatch.decide(OP, p).chosen.name

    # rows: from the bucket 12289-16384 (sigmoid / sqrtsoftplus, E % 8 == 0, E <= 256, k <= 16)
    assert chosen(65536, 256, 6, dtype="bfloat16", sf="sqrtsoftplus") == "rows"
    assert chosen(32768, 256, 8, dtype="float16") == "rows"
    assert chosen(16384, 256, 6, dtype="bfloat16") == "rows"
    assert chosen(12288, 256, 6, dtype="bfloat16") == "screened"
    assert chosen(65536, 256, 6) == "rows"  # float32 too (measured faster from the fifth session)
    assert chosen(16384, 256, 6) == "rows"
    assert chosen(12288, 256, 6) == "screened"
    assert chosen(65536, 256, 6, dtype="bfloat16", sf="softmax") == "screened"
    assert chosen(65536, 512, 6, dtype="bfloat16") == "screened"
    assert chosen(65536, 256, 24, dtype="bfloat16") == "screened"
    # group-limited: rows' grouped form above 12288 tokens where groups are 16n experts, k <= 8 and
    # k / group_topk <= 2; grouped otherwise
    assert chosen(65536, 256, 8, groups=8, dtype="bfloat16") == "rows"
    assert chosen(32768, 256, 8, groups=8) == "rows"
    assert chosen(16384, 256, 8, groups=8) == "rows"
    assert chosen(12288, 256, 8, groups=8) == "grouped"
    assert chosen(65536, 256, 8, groups=8, gt=2) == "grouped"  # k / group_topk = 4
    assert chosen(65536, 256, 16, groups=8) == "grouped"       # k > 8
    assert chosen(65536, 256, 8, groups=32, gt=8) == "grouped"  # groups of 8 experts
    assert chosen(65536, 256, 8, groups=8, sf="softmax") == "grouped"

    assert chosen(1, 256, 6) == "screened"
    assert chosen(128, 256, 6) == "screened"
    assert chosen(65536, 512, 16) == "screened"
    assert chosen(128, 1024, 8) == "naive"
    assert chosen(4096, 1024, 8) == "threshold"
    assert chosen(4096, 256, 32) == "radix"
    assert chosen(128, 1024, 64) == "radix"
    assert chosen(16384, 3072, 16) == "radix"
    assert chosen(16384, 3072, 8) == "naive"
    assert chosen(16, 8192, 6) == "radix"  # the only kernel there
    assert chosen(4096, 256, 8, groups=8) == "grouped"  # DeepSeek-V3 style
    assert chosen(4096, 256, 32, groups=8) == "grouped"  # radix, threshold and screened decline groups
    assert chosen(4096, 130, 6, groups=13, gt=3) == "naive"  # groups of 10 experts: not whole lanes
    assert chosen(4096, 1024, 32, groups=8) == "naive"  # E > 512
