"""The wheel ships the kernel sources; a plugin installed beside it shows up in the registry."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_fresh_venv_finds_sources_and_plugin(tmp_path):
    dist = tmp_path / "dist"
    for src in (ROOT, ROOT / "plugins" / "ds4kern-cupy-router"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(dist), str(src)], check=True, cwd=tmp_path)
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 2, wheels
    import zipfile

    names = zipfile.ZipFile(next(w for w in wheels if w.name.startswith("ds4kern-"))).namelist()
    shipped = {p.relative_to(ROOT / "cuda_src").as_posix() for p in (ROOT / "cuda_src").rglob("*.cu*")}
    for rel in shipped:
        assert f"ds4kern/cuda_src/{rel}" in names, f"{rel} missing from the wheel"
    pkgs = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "ds4kern").rglob("__init__.py")}
    for pkg in pkgs:
        assert f"{pkg}/__init__.py" in names, f"package {pkg} missing from the wheel (pyproject's packages)"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The venv's own dependencies come from this interpreter's site folders (no network needed);
    # ds4kern and the plugin are installed into the venv itself from the wheels.
    import site

    site_pkgs = next(env_dir.glob("lib/python*/site-packages"))
    (site_pkgs / "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-index", *map(str, wheels)], check=True)
    code = (
        "import ds4kern, ds4kern.core.kernels as k, numpy as np, sys;"
        "print(ds4kern.__file__);"
        "print(*k.list_sources());"
        "print(k.load_source('router/naive.cu')[:60].splitlines()[0]);"
        "print(*sorted(v.name for v in ds4kern.variants('router_topk')));"
        "print(ds4kern.registry.plugins['cupy_router'].dist);"
        "print('cupy_composite' in str(ds4kern.explain('router_topk', np.ones((2, 8), np.float32), 2)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DS4KERN_PLUGINS")}
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(site_pkgs)), lines[0]
    assert set(lines[1].split()) == {r for r in shipped if r.endswith(".cu")}
    assert lines[2] == '#line 1 "cuda_src/router/naive.cu"'
    import ds4kern

    builtin = [v.name for v in ds4kern.variants("router_topk") if v.plugin == "ds4kern.ops.router.variants"]
    assert lines[3].split() == sorted(builtin + ["cupy_composite"])
    assert lines[4] == "ds4kern-cupy-router 0.1.0"
    assert lines[5] == "True"
