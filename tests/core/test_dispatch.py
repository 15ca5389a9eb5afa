"""Dispatcher precedence (explicit > context > environment > heuristic), buckets, explain."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.registry import Variant

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


@pytest.mark.parametrize("args,words", [
    (("router_topk", "nope"), "'nope' is not a registered variant of router_topk"),
    (("router_tpok", "naive"), "unknown op 'router_tpok'"),
    (({"router_topk": "reference", "compress_decode": "nope"},), "'nope' is not a registered variant"),
])
def test_use_variant_refuses_unknown_names(args, words):
    with pytest.raises(ValueError, match=words):
        with ds4kern.use_variant(*args):
            pass
