import os

import numpy as np
import pytest


def _gpu_reason():
    try:
        import cupy
    except Exception as e:
        return f"CuPy not importable ({type(e).__name__}); install ds4kern[cuda12] or [cuda13] on a GPU machine"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device"


GPU_SKIP_REASON = _gpu_reason()


def _shard(config, items):
    """``DS4KERN_TEST_SHARD=i/n``: keep every n-th test from the i-th (0-based), so n pytest
    processes share one GPU run (bench/gpu_call.sh); the rest are deselected."""
    spec = os.environ.get("DS4KERN_TEST_SHARD", "")
    if not spec:
        return
    try:
        i, n = (int(v) for v in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"DS4KERN_TEST_SHARD must be i/n with 0 <= i < n, got {spec!r}") from None
    keep = [t for j, t in enumerate(items) if j % n == i]
    config.hook.pytest_deselected(items=[t for j, t in enumerate(items) if j % n != i])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    if GPU_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {GPU_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_autotune(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's autotune cache, and none leaves autotune switched on."""
    from ds4kern.core import autotune

    monkeypatch.setenv("DS4KERN_CACHE_DIR", str(tmp_path_factory.mktemp("ds4kern-cache")))
    monkeypatch.delenv("DS4KERN_AUTOTUNE", raising=False)
    yield
    autotune._state["enabled"] = None
    autotune.clear()


@pytest.fixture
def rng():
    """Fresh inputs every run; the seed is printed on failure to reproduce."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def cp():
    import cupy

    return cupy


@pytest.fixture
def clean_overrides(monkeypatch):
    monkeypatch.delenv("DS4KERN_VARIANT", raising=False)
    yield


def require_support(op, variant, *args, **kwargs):
    """Skip unless the registry says ``variant`` supports ``op(*args, **kwargs)`` (the reason is
    the variant's own ``supports`` answer, from ``ds4kern.explain``): tests never copy a
    variant's limits."""
    import ds4kern

    d = ds4kern.explain(op, *args, **kwargs)
    cand = next((c for c in d.candidates if c.variant.name == variant), None)
    if cand is None:
        pytest.skip(f"{op}: variant {variant} is not registered")
    if cand.rejected is not None:
        pytest.skip(f"{op}/{variant}: {cand.rejected}")


def supported_variants(op, *args, backend="cuda", **kwargs):
    """Names of the ``backend`` variants the registry says can run ``op(*args, **kwargs)``."""
    import ds4kern

    d = ds4kern.explain(op, *args, **kwargs)
    return [c.variant.name for c in d.candidates if c.rejected is None and c.variant.backend == backend]
