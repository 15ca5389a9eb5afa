"""Command line on a machine without a GPU (the GPU run is exercised on the device)."""

import subprocess
import sys

import pytest

from conftest import GPU_SKIP_REASON


def run(*args):
    return subprocess.run([sys.executable, "-m", "ds4kern", *args], capture_output=True, text=True)


def test_info_lists_ops_variants_plugins():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "router_topk" in r.stdout and "naive" in r.stdout and "reference" in r.stdout
    assert "ds4kern.ops.router.variants (builtin)" in r.stdout
    assert "router/naive.cu" in r.stdout


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="the GPU machine runs the GPU path of the main job")
def test_main_job_without_gpu_runs_reference_and_says_so():
    r = run("run", "--tokens", "512")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No GPU" in r.stdout and "reference backend" in r.stdout
    assert "reference" in r.stdout and " ok " in r.stdout


def test_usage_error():
    r = run("frobnicate")
    assert r.returncode != 0 and "invalid choice" in r.stderr
