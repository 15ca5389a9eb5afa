"""Registry: built-ins through the same hook as plugins, entry points, env switches, failures."""

import sys
import textwrap

import numpy as np
import pytest

import ds4kern
from ds4kern.core.registry import PluginWarning, Registry, Variant


def test_builtins_registered_through_the_hook():
    names = {(v.op, v.name): v for v in ds4kern.variants()}
    assert ("router_topk", "reference") in names and ("router_topk", "naive") in names
    assert names[("router_topk", "naive")].plugin == "ds4kern.ops.router.variants"
    assert names[("router_topk", "naive")].backend == "cuda"
    assert names[("router_topk", "reference")].backend == "numpy"


class FakePlugin:
    calls = 0

    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        FakePlugin.calls += 1

        def fn(a):
            a.weights[...] = 7.0
            a.indices[...] = 0

        register(Variant("router_topk", "fake_numpy", "numpy", fn, cost=0.5, description="test"))


def test_runtime_plugin_is_used_and_explained(clean_overrides):
    name = ds4kern.register_plugin(FakePlugin(), name="fake")
    try:
        assert any(v.name == "fake_numpy" and v.plugin == "fake" for v in ds4kern.variants("router_topk"))
        x = np.ones((3, 8), np.float32)
        w, _ = ds4kern.router_topk(x, 2)  # cheaper than reference: the heuristic picks it
        assert (w == 7.0).all()
        text = str(ds4kern.explain("router_topk", x, 2))
        assert "fake_numpy" in text and "plugin fake" in text and "chosen: fake_numpy (heuristic)" in text
        w, _ = ds4kern.router_topk(x, 2, variant="reference")
        assert (w != 7.0).all()
    finally:
        ds4kern.unregister_plugin(name)
    assert not any(v.name == "fake_numpy" for v in ds4kern.variants())
    w, _ = ds4kern.router_topk(np.ones((3, 8), np.float32), 2)
    assert (w != 7.0).all()


class RaisingPlugin:
    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        register(Variant("router_topk", "half_done", "numpy", lambda a: None))
        raise RuntimeError("boom")


def test_plugin_raising_in_registration_is_skipped_with_warning():
    name = ds4kern.register_plugin(RaisingPlugin(), name="raiser")
    try:
        with pytest.warns(PluginWarning, match="raiser.*boom"):
            vs = ds4kern.variants("router_topk")
        assert not any(v.name == "half_done" for v in vs)
        assert any(v.name == "reference" for v in vs)
    finally:
        ds4kern.unregister_plugin(name)


class DuplicatePlugin:
    @ds4kern.hookimpl
    def ds4kern_register_variants(self, register):
        register(Variant("router_topk", "reference", "numpy", lambda a: None))


def test_duplicate_variant_keeps_the_first():
    name = ds4kern.register_plugin(DuplicatePlugin(), name="dup")
    try:
        with pytest.warns(PluginWarning, match="already provided"):
            v = ds4kern.registry.get("router_topk", "reference")
        assert v.plugin == "ds4kern.ops.router.variants"
    finally:
        ds4kern.unregister_plugin(name)


class Misspelt:
    @ds4kern.hookimpl
    def ds4kern_register_variant(self, register):  # missing "s"
        pass


def test_misspelt_hook_is_refused():
    with pytest.raises(Exception, match="ds4kern_register_variant"):
        ds4kern.register_plugin(Misspelt(), name="misspelt")
    assert "misspelt" not in ds4kern.registry.plugins


@pytest.mark.parametrize("bad", [
    dict(op="router topk"), dict(name=""), dict(backend="rocm"), dict(fn=None),
])
def test_variant_validation(bad):
    kw = dict(op="router_topk", name="x", backend="numpy", fn=lambda a: None, **{})
    kw.update(bad)
    with pytest.raises((ValueError, TypeError)):
        Variant(**kw).check()


def _make_entry_point_dir(tmp_path, name, body, dist="fakedist"):
    """A real distribution on sys.path: a module plus dist-info with entry_points.txt."""
    (tmp_path / f"{name}_mod.py").write_text(textwrap.dedent(body))
    di = tmp_path / f"{dist}-0.1.dist-info"
    di.mkdir()
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (di / "entry_points.txt").write_text(f"[ds4kern]\n{name} = {name}_mod\n")


GOOD = """
import ds4kern
@ds4kern.hookimpl
def ds4kern_register_variants(register):
    register(ds4kern.Variant("router_topk", "ep_variant", "numpy", lambda a: None, cost=50))
"""


@pytest.fixture
def ep_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for m in [m for m in sys.modules if m.endswith("_mod")]:
        del sys.modules[m]


def test_entry_point_plugin_loads(ep_path, monkeypatch):
    monkeypatch.delenv("DS4KERN_PLUGINS", raising=False)
    monkeypatch.delenv("DS4KERN_DISABLE_PLUGINS", raising=False)
    _make_entry_point_dir(ep_path, "goodplug", GOOD)
    reg = Registry()
    assert any(v.name == "ep_variant" and v.plugin == "goodplug" for v in reg.variants("router_topk"))
    assert reg.plugins["goodplug"].dist == "fakedist 0.1"
    assert reg.plugins["goodplug"].status == "loaded"


OTHER = GOOD.replace("ep_variant", "other_variant")


@pytest.mark.parametrize("env,loaded", [
    ({"DS4KERN_PLUGINS": "none"}, False),
    ({"DS4KERN_PLUGINS": "otherplug"}, False),
    ({"DS4KERN_PLUGINS": "goodplug,otherplug"}, True),
    ({"DS4KERN_PLUGINS": "all"}, True),
    ({"DS4KERN_DISABLE_PLUGINS": "goodplug"}, False),
    ({"DS4KERN_DISABLE_PLUGINS": "otherplug"}, True),
])
def test_env_selects_and_blocks(ep_path, monkeypatch, env, loaded):
    monkeypatch.delenv("DS4KERN_PLUGINS", raising=False)
    monkeypatch.delenv("DS4KERN_DISABLE_PLUGINS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _make_entry_point_dir(ep_path, "goodplug", GOOD)
    _make_entry_point_dir(ep_path, "otherplug", OTHER, dist="otherdist")
    reg = Registry()
    assert any(v.name == "ep_variant" for v in reg.variants("router_topk")) == loaded
    assert reg.plugins["goodplug"].status == ("loaded" if loaded else "blocked")


@pytest.mark.parametrize("env,loaded", [
    ({"DS4KERN_PLUGINS": "otherplug"}, True),  # nothing known: the default (every plugin) stands
    ({"DS4KERN_PLUGINS": "goodplug,otherplug"}, True),
    ({"DS4KERN_PLUGINS": "none,otherplug"}, False),
    ({"DS4KERN_DISABLE_PLUGINS": "otherplug"}, True),
])
def test_unknown_plugin_name_in_env_warns(ep_path, monkeypatch, env, loaded):
    from ds4kern.core.env import EnvWarning

    monkeypatch.delenv("DS4KERN_PLUGINS", raising=False)
    monkeypatch.delenv("DS4KERN_DISABLE_PLUGINS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _make_entry_point_dir(ep_path, "goodplug", GOOD)
    reg = Registry()
    with pytest.warns(EnvWarning, match=rf"{next(iter(env))} names unknown plugin\(s\) \['otherplug'\].*goodplug"):
        got = any(v.name == "ep_variant" for v in reg.variants("router_topk"))
    assert got == loaded


def test_broken_entry_point_warns_and_is_skipped(ep_path, monkeypatch):
    monkeypatch.delenv("DS4KERN_PLUGINS", raising=False)
    _make_entry_point_dir(ep_path, "brokenplug", "raise ImportError('missing dependency xyz')\n", dist="brokendist")
    reg = Registry()
    with pytest.warns(PluginWarning, match="brokenplug.*missing dependency xyz"):
        vs = reg.variants("router_topk")
    assert any(v.name == "naive" for v in vs)
    assert reg.plugins["brokenplug"].status.startswith("failed")


def test_import_does_not_load_plugins():
    import subprocess

    code = "import ds4kern, sys; print(ds4kern.registry._pm is None, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
