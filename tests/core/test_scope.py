"""Memory scopes: off by default and inert, nesting, one JSON line per exit, every op call in a
scope of its own name, the summary; on the GPU, bytes and peaks of CuPy's pool."""

import json

import numpy as np
import pytest

import ds4kern
from ds4kern.core import scope as S


@pytest.fixture
def stats(tmp_path, monkeypatch):
    monkeypatch.delenv(S.ENV, raising=False)
    S.refresh()
    path = tmp_path / "scopes.jsonl"
    S.set_stats_path(str(path))
    yield path
    S.set_stats_path(None)


def test_off_by_default_is_one_shared_inert_object(tmp_path, monkeypatch):
    monkeypatch.delenv(S.ENV, raising=False)
    S.refresh()
    S.set_stats_path(None)
    assert S.stats_path() is None
    a, b = ds4kern.scope("x"), ds4kern.scope("y")
    assert a is b
    with a:
        ds4kern.topk_rows(np.ones((2, 3), np.float32), 1)
    assert list(tmp_path.iterdir()) == []


def test_environment_variable_turns_it_on(tmp_path, monkeypatch):
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv(S.ENV, str(path))
    S.refresh()
    try:
        with ds4kern.scope("outer"):
            pass
    finally:
        monkeypatch.delenv(S.ENV)
        S.refresh()
    (rec,) = S.read_stats(path)
    assert rec["name"] == "outer" and rec["path"] == "outer" and rec["depth"] == 0


def test_nesting_paths_and_fields(stats):
    with ds4kern.scope("layer"):
        with ds4kern.scope("attention"):
            ds4kern.topk_rows(np.ones((2, 5), np.float32), 2)
        with ds4kern.scope("moe"):
            pass
    recs = S.read_stats(stats)
    assert [r["path"] for r in recs] == ["layer/attention/topk_rows", "layer/attention", "layer/moe", "layer"]
    for r in recs:
        assert set(r) == {"name", "path", "depth", "entry_bytes", "exit_bytes", "peak_bytes", "allocations", "seconds"}
        assert r["peak_bytes"] >= max(r["entry_bytes"], r["exit_bytes"]) and r["seconds"] >= 0
    assert [r["depth"] for r in recs] == [2, 1, 1, 0]


def test_exception_inside_a_scope_is_recorded_and_propagates(stats):
    with pytest.raises(ValueError, match="k must be in"):
        with ds4kern.scope("outer"):
            ds4kern.topk_rows(np.ones((2, 5), np.float32), 0)
    assert [r["path"] for r in S.read_stats(stats)] == ["outer/topk_rows", "outer"]
    with ds4kern.scope("after"):
        pass
    assert S.read_stats(stats)[-1]["path"] == "after"  # the stack was unwound


@pytest.mark.parametrize("name", ["", "a/b", 3])
def test_bad_scope_names(stats, name):
    with pytest.raises(ValueError, match="scope name"):
        ds4kern.scope(name)


def test_read_stats_names_the_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(dict(path="a", entry_bytes=0, peak_bytes=1)) + "\n{truncated\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        S.read_stats(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r":1: not a scope record"):
        S.read_stats(p)


def test_summary_takes_the_peak_over_calls():
    recs = [dict(path="a", entry_bytes=0, peak_bytes=10, allocations=1),
            dict(path="a", entry_bytes=5, peak_bytes=30, allocations=2),
            dict(path="a/b", entry_bytes=8, peak_bytes=9)]
    rows = S.summarize(recs)
    assert rows == [dict(path="a", calls=2, peak_bytes=30, peak_above_entry=25, allocations=3),
                    dict(path="a/b", calls=1, peak_bytes=9, peak_above_entry=1, allocations=0)]
    text = S.format_summary(rows)
    assert "a/b" in text and "peak MiB" in text


@pytest.mark.gpu
def test_gpu_bytes_and_peaks(stats, cp):
    pool = cp.get_default_memory_pool()
    with ds4kern.scope("outer"):
        base = pool.used_bytes()
        with ds4kern.scope("inner"):
            a = cp.empty(1 << 20, np.float32)  # 4 MiB held inside inner
            del a
        s = cp.random.standard_normal((8, 262144), dtype=cp.float32)
        ds4kern.topk_rows(s, 512, variant="radix")  # two levels: candidate scratch
    recs = {r["path"]: r for r in S.read_stats(stats)}
    assert recs["outer/inner"]["peak_bytes"] - recs["outer/inner"]["entry_bytes"] >= 4 << 20
    assert recs["outer/inner"]["allocations"] >= 1
    op = recs["outer/topk_rows"]
    assert op["allocations"] >= 3 and op["peak_bytes"] - op["entry_bytes"] >= 8 * 16 * 512 * 8
    assert recs["outer"]["peak_bytes"] >= recs["outer/inner"]["peak_bytes"] >= base
