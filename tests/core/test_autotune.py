"""Autotune: timing picks the faster variant, the winner is cached in memory and in an atomic
JSON file keyed by device, version, op and bucket, and precedence/explain behave."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import ds4kern
from ds4kern.core import autotune
from ds4kern.core.registry import Variant

X = np.ones((64, 16), np.float32)


def _fill(value, delay):
    def fn(a):
        if delay:
            time.sleep(delay)
        a.weights[...] = value
        a.indices[...] = 0
    return fn


class TwoSpeeds:
    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        # the heuristic prefers "slow" (lower cost hint); timing must prefer "fast"
        register(Variant("router_topk", "slow", "numpy", _fill(1.0, 0.004), cost=0.1))
        register(Variant("router_topk", "fast", "numpy", _fill(2.0, 0.0), cost=0.2))


@pytest.fixture
def tuned(tmp_path, monkeypatch, clean_overrides):
    monkeypatch.setenv("DS4KERN_CACHE_DIR", str(tmp_path))
    name = ds4kern.register_plugin(TwoSpeeds(), name="two_speeds")
    autotune.clear()
    autotune.enable(True, repeat=3)
    yield tmp_path
    autotune.enable(False)
    autotune._state["enabled"] = None
    autotune.clear()
    ds4kern.unregister_plugin(name)


def weight(x=X):
    return float(ds4kern.router_topk(x, 2)[0][0, 0])


def test_timing_beats_the_heuristic_and_is_cached(tuned):
    d = ds4kern.explain("router_topk", X, 2)
    assert d.chosen.name == "slow" and any("not tuned yet" in n for n in d.notes)
    assert weight() == 2.0  # first call tunes, then runs the winner
    data = json.loads((tuned / "autotune.json").read_text())
    assert data["schema"] == 2 and len(data["entries"]) == 1
    key, entry = next(iter(data["entries"].items()))
    assert entry["variant"] == "fast" and set(entry["times_us"]) >= {"slow", "fast", "reference"}
    src = ds4kern.router_topk.op.sources_hash()
    assert "router_topk" in key and f"src {src}" in key and "cpu:" in key
    assert "float32" in key  # dtypes are part of the bucket
    d = ds4kern.explain("router_topk", X, 2)
    assert d.how == "autotune" and "cached winner" in d.why and str(tuned) in d.why
    assert not [p for p in tuned.iterdir() if p.name.startswith(".autotune-")]  # no temp files left


def test_other_bucket_is_tuned_separately(tuned):
    weight()
    weight(np.ones((64, 32), np.float32))
    assert len(json.loads((tuned / "autotune.json").read_text())["entries"]) == 2


def test_file_is_reused_by_a_new_process(tuned):
    weight()
    code = ("import numpy as np, ds4kern, sys; sys.path.insert(0, %r); from test_autotune import TwoSpeeds;"
            "ds4kern.register_plugin(TwoSpeeds(), name='two_speeds');"
            "d = ds4kern.explain('router_topk', np.ones((64, 16), np.float32), 2); print(d.how, d.chosen.name)"
            % os.path.dirname(__file__))
    env = {**os.environ, "DS4KERN_AUTOTUNE": "1", "DS4KERN_CACHE_DIR": str(tuned)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["autotune", "fast"]


def test_precedence_over_autotune(tuned, monkeypatch):
    weight()
    assert float(ds4kern.router_topk(X, 2, variant="slow")[0][0, 0]) == 1.0
    with ds4kern.use_variant("router_topk", "slow"):
        assert weight() == 1.0
    autotune.enable(False)
    assert weight() == 1.0  # off: the heuristic again


def test_corrupt_file_and_vanished_winner(tuned):
    (tuned / "autotune.json").write_text("{not json")
    assert weight() == 2.0
    assert json.loads((tuned / "autotune.json").read_text())["schema"] == 2
    # the winner's plugin goes away: the cached entry is ignored
    ds4kern.unregister_plugin("two_speeds")
    try:
        d = ds4kern.explain("router_topk", X, 2)
        assert d.how != "autotune" or d.chosen.name != "fast"
    finally:
        ds4kern.register_plugin(TwoSpeeds(), name="two_speeds")


class Knobs:
    """One variant with two settings: its default (first) is slow, timing must pick the other."""

    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        def fn(a, delay=0.0):
            if delay:
                time.sleep(delay)
            a.weights[...] = 4.0 if delay else 3.0
            a.indices[...] = 0

        register(Variant("router_topk", "knobs", "numpy", fn, cost=0.05,
                         configs=lambda p: [{"delay": 0.004}, {"delay": 0.0}]))


@pytest.fixture
def knobs(tmp_path, monkeypatch, clean_overrides):
    monkeypatch.setenv("DS4KERN_CACHE_DIR", str(tmp_path))
    name = ds4kern.register_plugin(Knobs(), name="knobs")
    autotune.clear()
    yield tmp_path
    autotune._state["enabled"] = None
    autotune.clear()
    ds4kern.unregister_plugin(name)


def test_settings_default_explicit_and_tuned(knobs):
    from ds4kern.core import dispatch

    d = ds4kern.explain("router_topk", X, 2)
    assert d.how == "heuristic" and d.chosen.label == "knobs[delay=0.004]"
    assert "settings delay=0.004 | delay=0.0" in str(d) and "knobs[delay=0.004]" in str(d)
    assert weight() == 4.0  # the default setting ran
    problem = d.problem
    v = dispatch.select("router_topk", problem, "knobs", config={"delay": 0.0})
    assert v.label == "knobs[delay=0.0]" and v.config == (("delay", 0.0),)
    with pytest.raises(ValueError, match="no setting"):
        dispatch.decide("router_topk", problem, "knobs", config={"delay": 1.0})
    with pytest.raises(ValueError, match="explicit variant"):
        dispatch.decide("router_topk", problem, config={"delay": 0.0})
    autotune.enable(True, repeat=3)
    assert weight() == 3.0  # tuned: the fast setting wins
    entry = next(iter(json.loads((knobs / "autotune.json").read_text())["entries"].values()))
    assert entry["variant"] == "knobs" and entry["config"] == {"delay": 0.0}
    assert {"knobs[delay=0.004]", "knobs[delay=0.0]", "reference"} <= set(entry["times_us"])
    d = ds4kern.explain("router_topk", X, 2)
    assert d.how == "autotune" and "cached winner" in d.why and d.chosen.label == "knobs[delay=0.0]"
    assert weight() == 3.0


def test_switches():
    autotune.enable(False)
    assert not autotune.enabled()
    with autotune.autotuning():
        assert autotune.enabled()
    assert not autotune.enabled()
    autotune._state["enabled"] = None
    with pytest.raises(ValueError):
        autotune.enable(True, repeat=0)
    assert not autotune.enabled()  # a refused call changes nothing


@pytest.mark.gpu
def test_gpu_autotune_times_cuda_variants_and_skips_capture(cp, tmp_path, monkeypatch, clean_overrides):
    monkeypatch.setenv("DS4KERN_CACHE_DIR", str(tmp_path))
    autotune.clear()
    autotune.enable(True, repeat=5)
    try:
        x = cp.asarray(np.random.default_rng().standard_normal((4096, 256)).astype(np.float32))
        w, i = ds4kern.router_topk(x, 6, score_function="sigmoid")
        entry = next(iter(json.loads((tmp_path / "autotune.json").read_text())["entries"].values()))
        assert {"naive", "threshold"} <= set(entry["times_us"])
        assert entry["variant"] == min(entry["times_us"], key=entry["times_us"].get)
        d = ds4kern.explain("router_topk", x, 6, score_function="sigmoid")
        assert d.how == "autotune" and d.chosen.name == entry["variant"]
        _, i_ref = ds4kern.router_topk(cp.asnumpy(x), 6, score_function="sigmoid")
        np.testing.assert_array_equal(cp.asnumpy(i), i_ref)
        # a new bucket first met inside a graph capture is not tuned (the heuristic decides)
        s = cp.cuda.Stream(non_blocking=True)
        y = cp.asarray(np.random.default_rng().standard_normal((100, 256)).astype(np.float32))
        with s:
            wo, io = cp.empty((100, 6), cp.float32), cp.empty((100, 6), cp.int32)
            ds4kern.router_topk(y, 6, out=(wo, io), variant="naive")  # compile outside the capture
            s.begin_capture()
            ds4kern.router_topk(y, 6, out=(wo, io))
            s.end_capture()
        assert len(json.loads((tmp_path / "autotune.json").read_text())["entries"]) == 1
    finally:
        autotune._state["enabled"] = None
        autotune.clear()


def test_changed_kernel_source_never_serves_a_stale_winner(tmp_path, monkeypatch):
    """The cache key carries a hash of the op's folded kernel sources and options: editing a
    kernel (here: a copy of the source folder with one byte changed) changes the key."""
    import shutil

    from ds4kern.core import kernels, op

    before = op.sources_hash(ds4kern.router_topk.op.kernels)
    copy = tmp_path / "cuda_src"
    shutil.copytree(kernels.source_dir(), copy)
    path = copy / ds4kern.router_topk.op.kernels[0].source
    path.write_text(path.read_text() + "\n// changed\n")
    monkeypatch.setattr(kernels, "source_dir", lambda: copy)
    kernels.load_source.cache_clear()
    try:
        assert op.sources_hash(ds4kern.router_topk.op.kernels) != before
    finally:
        kernels.load_source.cache_clear()

