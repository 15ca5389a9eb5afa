"""Command line on a machine without a GPU (the GPU run is exercised on the device)."""

import os
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
    r = run("run", "--check-steps", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No GPU" in r.stdout and "reference backend" in r.stdout
    assert "float64 reference" in r.stdout and ": ok (" in r.stdout


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="the GPU machine runs the GPU path of the router job")
def test_router_job_without_gpu_runs_reference_and_says_so():
    r = run("router", "--tokens", "512")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No GPU" in r.stdout and "reference backend" in r.stdout
    assert "reference" in r.stdout and " ok " in r.stdout


def test_usage_error():
    r = run("frobnicate")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_no_command_prints_the_commands():
    r = run()
    assert r.returncode == 0, r.stderr
    for cmd in ("run", "router", "attention", "info", "profile", "compile-check"):
        assert cmd in r.stdout


def test_every_option_has_help_text():
    import argparse

    from ds4kern.__main__ import _parser

    ap = _parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    assert {c.dest for c in sub._choices_actions} == set(sub.choices)  # every command has a help line
    assert all(c.help for c in sub._choices_actions)
    for name, p in sub.choices.items():
        for a in p._actions:
            assert a.help, f"{name} {a.option_strings or a.dest}: no help text"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A payload and a capture, and broken files of each kind."""
    import json

    import numpy as np

    from ds4kern.replay import encode_payload

    d = tmp_path_factory.mktemp("cli")
    arr = np.random.default_rng(0).integers(0, 64, (40, 3, 6)).astype(np.uint8)
    text = json.dumps(encode_payload(arr))
    (d / "p.json").write_text(text)
    (d / "truncated.json").write_text(text[: len(text) // 2])
    (d / "malformed.json").write_text(json.dumps({"data": "AA==", "shape": [1, 2]}))
    np.save(d / "c.npy", arr)
    np.save(d / "floats.npy", arr.astype(np.float32))
    (d / "truncated.npy").write_bytes((d / "c.npy").read_bytes()[:90])
    return d


def cli(capsys, *args):
    """``python -m ds4kern ARGS`` in this process: (exit code, stdout, stderr); any exception but
    SystemExit would have been a traceback."""
    from ds4kern.__main__ import main

    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args,words", [
    (["profile", "{d}/missing.json", "--out", "{d}/r.json"], "no such file"),
    (["profile", "{d}/truncated.json", "--out", "{d}/r.json"], "not valid JSON"),
    (["profile", "{d}/malformed.json", "--out", "{d}/r.json"], "payload field 'shape'"),
    (["profile", "{d}/truncated.npy", "--out", "{d}/r.json"], "truncated.npy"),
    (["profile", "{d}/floats.npy", "--out", "{d}/r.json", "--experts", "64"], "integers"),
    (["profile", "{d}/p.json", "--out", "{d}/r.json", "--top", "foo"], "--top"),
    (["profile", "{d}/p.json", "--out", "{d}/r.json", "--experts", "0"], "--experts"),
    (["profile", "{d}/p.json", "--out", "{d}/r.json", "--hash-layers", "0,3"], "--hash-layers"),
    (["profile", "{d}/p.json", "--out", "{d}/r.json", "--cache-sizes", "-3"], "--cache-sizes"),
    (["profile", "{d}/p.json", "--out", "{d}/no/such/folder/r.json"], "does not exist"),
    (["profile", "{d}/p.json", "--out", "{d}/r.json", "--png", "{d}/no/x.png"], "does not exist"),
    (["profile", "{d}/p.json"], "--out"),
    (["router", "--tokens", "-5"], "--tokens"),
    (["router", "--repeat", "0"], "--repeat"),
    (["run", "--layers", "0"], "--layers"),
    (["run", "--model", "small"], "--model"),
    (["compile-check", "--arch", "foo"], "--arch"),
])
def test_ordinary_mistakes_are_one_line_and_exit_2(inputs, capsys, args, words):
    rc, out, err = cli(capsys, *(a.format(d=inputs) for a in args))
    assert rc == 2, out + err
    assert len(err.strip().splitlines()) == 1 and words in err and out == "", err
    assert not (inputs / "r.json").exists()


def test_png_without_matplotlib_stops_before_the_work(inputs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    out = inputs / "png.json"
    rc, _, err = cli(capsys, "profile", str(inputs / "p.json"), "--out", str(out), "--png", str(inputs / "x.png"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "pip install 'ds4kern[plot]'" in err, err
    assert not out.exists()  # checked before the analysis, not after writing the JSON


def NO_STATS_ENV():
    return {k: v for k, v in os.environ.items() if k != "DS4KERN_SCOPE_STATS"}


def test_scope_stats_switch_end_to_end(tmp_path, monkeypatch):
    """--scope-stats writes the run's scopes (the command and every op call inside it), the file
    parses, and the scope-stats command summarises it; without the switch nothing is written."""
    import json

    monkeypatch.delenv("DS4KERN_SCOPE_STATS", raising=False)
    path = tmp_path / "scopes.jsonl"
    r = subprocess.run([sys.executable, "-m", "ds4kern", "router", "--tokens", "64", "--repeat", "2", "--scope-stats",
                        str(path)], capture_output=True, text=True, cwd=tmp_path,
                       env=NO_STATS_ENV())
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    paths = {rec["path"] for rec in recs}
    assert "router" in paths and "router/router_topk" in paths, paths
    assert "memory scopes" in r.stdout
    r2 = run("scope-stats", str(path))
    assert r2.returncode == 0 and "router/router_topk" in r2.stdout
    before = sorted(p.name for p in tmp_path.iterdir())
    r3 = subprocess.run([sys.executable, "-m", "ds4kern", "router", "--tokens", "64", "--repeat", "2"],
                        capture_output=True, text=True, cwd=tmp_path,
                        env=NO_STATS_ENV())
    assert r3.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == before
    assert "memory scopes" not in r3.stdout


def test_scope_stats_command_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = run("scope-stats", str(bad))
    assert r.returncode == 2 and "bad.jsonl:1: not a JSON line" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run("scope-stats", str(empty))
    assert r.returncode == 2 and "no scope records" in r.stderr


def test_attention_command_without_gpu(tmp_path):
    if GPU_SKIP_REASON is None:
        pytest.skip("the GPU machine runs the GPU path")
    path = tmp_path / "att.jsonl"
    r = run("attention", "--layer-kind", "csa", "--batch", "2", "--context", "130", "--steps", "2",
            "--scope-stats", str(path))
    assert r.returncode == 0, r.stderr
    assert "No GPU" in r.stdout and "small config" in r.stdout
    for part in ("attention/indexer", "attention/sparse_attention", "attention/q", "scope peaks"):
        assert part in r.stdout, part
    import json

    paths = {json.loads(line)["path"] for line in path.read_text().splitlines()}
    assert {"attention", "attention/compressor/compress_decode", "attention/indexer/indexer_topk"} <= paths


def test_attention_prefill_command_without_gpu():
    if GPU_SKIP_REASON is None:
        pytest.skip("the GPU machine runs the GPU path")
    r = run("attention", "--layer-kind", "hca", "--batch", "2", "--context", "130", "--steps", "1", "--prefill", "9")
    assert r.returncode == 0, r.stderr
    assert "prefill of 9 tokens" in r.stdout
    for part in ("attention_prefill/compressor", "attention_prefill/sparse_attention", "attention_prefill/output"):
        assert part in r.stdout, part


def test_run_scope_stats_switch_end_to_end(tmp_path, monkeypatch):
    """The main job's --scope-stats writes the step's scopes (every layer's attention and MoE parts and
    the ops inside them); without the switch nothing is written."""
    import json

    monkeypatch.delenv("DS4KERN_SCOPE_STATS", raising=False)
    if GPU_SKIP_REASON is None:
        pytest.skip("the GPU machine runs the timed GPU path")
    path = tmp_path / "step.jsonl"
    r = subprocess.run([sys.executable, "-m", "ds4kern", "run", "--check-steps", "2", "--scope-stats", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, env=NO_STATS_ENV())
    assert r.returncode == 0, r.stderr
    paths = {json.loads(line)["path"] for line in path.read_text().splitlines()}
    for want in ("step", "step/layer0/attention/q/grouped_linear", "step/layer0/moe/router/router_hash",
                 "step/layer1/moe/router/router_topk", "step/layer1/moe/experts/expert_mlp",
                 "step/layer1/attention/indexer/indexer_topk", "step/layer3/moe/permute/moe_permute"):
        assert want in paths, (want, sorted(paths)[:20])
    before = sorted(p.name for p in tmp_path.iterdir())
    r2 = subprocess.run([sys.executable, "-m", "ds4kern", "run", "--check-steps", "1"], capture_output=True, text=True,
                        cwd=tmp_path, env=NO_STATS_ENV())
    assert r2.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == before
