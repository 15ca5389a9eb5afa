"""Offline locality statistics against slow per-definition references."""

import math
from collections import OrderedDict

import numpy as np
import pytest

from ds4kern.locality.analysis import Workspace, analyze, layer_stats, stack_distances, summary_text


def slow_lru_hits(ids, E, n, weights=None):
    cache, hits, whits = OrderedDict(), 0, 0.0
    for r in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[r, s])
            if not 0 <= e < E:
                continue
            if e in cache:
                hits += 1
                whits += 0.0 if weights is None else float(weights[r, s])
                cache.move_to_end(e)
            else:
                cache[e] = True
                if len(cache) > n:
                    cache.popitem(last=False)
    return hits, whits


def slow_adjacency(ids, E, positions, seq):
    k = ids.shape[1]
    ov, jac, stab, pairs = [], [], [], 0
    R = ids.shape[0]
    for i in range(R):
        for j in range(R):
            if seq[i] == seq[j] and positions[j] == positions[i] + 1:
                A = {int(x) for x in ids[i] if 0 <= x < E}
                B = {int(x) for x in ids[j] if 0 <= x < E}
                pairs += 1
                ov.append(len(A & B) / k)
                jac.append(len(A & B) / len(A | B) if A | B else 1.0)
                stab.append(np.mean([ids[i, s] == ids[j, s] and 0 <= ids[i, s] < E for s in range(k)]))
    return pairs, (np.mean(ov) if ov else None), (np.mean(jac) if jac else None), (np.mean(stab) if stab else None)


@pytest.mark.parametrize("E,k", [(8, 1), (16, 3), (64, 6), (130, 4)])
def test_stack_distances_equal_lru_simulation(rng, E, k):
    R = 120
    ids = rng.integers(0, min(E, 3 * k + 2), (R, k))  # a small working set: many hits
    for r in range(R):  # routers give distinct experts per record
        ids[r] = rng.choice(min(E, 3 * k + 2), k, replace=False) if k <= min(E, 3 * k + 2) else ids[r]
    ids[rng.random((R, k)) < 0.05] = E + 3  # invalid ids are skipped
    dist, valid = stack_distances(ids, E)
    for n in (1, 2, 3, 5, 8, E):
        assert int(((dist >= 0) & (dist < n)).sum()) == slow_lru_hits(ids, E, n)[0], n


def slow_stack_distances(ids, E):
    """Per definition: distinct experts touched since the same expert's previous access."""
    out = np.full(ids.shape, -1, np.int64)
    stack = []  # most recent first
    for r in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[r, s])
            if not 0 <= e < E:
                continue
            if e in stack:
                out[r, s] = stack.index(e)
                stack.remove(e)
            stack.insert(0, e)
    return out


@pytest.mark.parametrize("R,k,E", [(700, 2, 300), (1500, 3, 256), (130, 6, 64), (65, 1, 5)])
def test_stack_distances_per_access_long_gaps(rng, R, k, E):
    # skewed popularity: hot experts recur within a record or two, cold ones after hundreds of
    # records (the per-block and whole-block paths), plus duplicates inside records and invalid ids
    ids = (E * rng.random((R, k)) ** 3).astype(np.int64)
    ids[rng.random((R, k)) < 0.03] = -1
    ids[rng.random((R, k)) < 0.03] = E
    if k > 1:
        dup = rng.random(R) < 0.05
        ids[dup, k - 1] = ids[dup, 0]
    want = slow_stack_distances(ids, E)
    ws = Workspace()
    for chunk in (1 << 16, 1 << 16, 7, 64):  # a reused workspace, and chunks of accesses that split records
        dist, valid = stack_distances(ids, E, workspace=ws, chunk=chunk)
        np.testing.assert_array_equal(dist, want)
        np.testing.assert_array_equal(valid, (ids >= 0) & (ids < E))
    gaps = [b - a for e in range(E) for a, b in zip(*(lambda r: (r[:-1], r[1:]))(np.flatnonzero((ids == e).any(1))))]
    if R >= 700:
        assert max(gaps) > 2 * 64  # the whole-block path ran


def test_stack_distance_with_duplicates_in_a_record():
    ids = np.array([[1, 1, 2], [2, 3, 1], [1, 1, 1]])
    dist, _ = stack_distances(ids, 4)
    for n in (1, 2, 3):
        assert int(((dist >= 0) & (dist < n)).sum()) == slow_lru_hits(ids, 4, n)[0]


def test_layer_stats_against_definitions(rng):
    E, k, R = 32, 4, 200
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(R)])
    ids[5, 2] = -1
    ids[9, 0] = E
    w = rng.random((R, k))
    # two interleaved sequences with a gap
    seq = np.arange(R) % 2
    pos = np.arange(R) // 2
    pos[seq == 1] += 10
    pos[150:] += 1  # a gap: no pair across it
    st = layer_stats(ids, E, weights=w, positions=pos, seq_ids=seq, cache_sizes=[3, 5], top_n="all")
    valid = (ids >= 0) & (ids < E)
    assert st["records"] == R and st["selections"] == int(valid.sum())
    hist = np.array([(ids[valid] == e).sum() for e in range(E)])
    assert st["hist"] == hist.tolist()
    wsum = np.array([w[valid][ids[valid] == e].sum() for e in range(E)])
    np.testing.assert_allclose(st["weight"], wsum)
    p = hist[hist > 0] / hist.sum()
    assert math.isclose(st["entropy"], -(p * np.log(p)).sum(), rel_tol=1e-12)
    assert math.isclose(st["entropy_ratio"], st["entropy"] / math.log(E))
    # top experts: count desc, weight desc, id asc; cumulative coverage
    ref = sorted([e for e in range(E) if hist[e]], key=lambda e: (-hist[e], -wsum[e], e))
    assert [t["id"] for t in st["top_experts"]] == ref
    assert math.isclose(st["top_experts"][-1]["cum_pct"], 100.0)
    pairs, ov, jac, stab = slow_adjacency(ids, E, pos, seq)
    assert st["adjacent_pairs"] == pairs
    assert math.isclose(st["overlap"], ov) and math.isclose(st["jaccard"], jac)
    assert math.isclose(st["position_stability"], stab)
    sizes = [c["size"] for c in st["cache"]]
    assert sizes == [1, 2, 3, 4, 5, 8, 16, 32]
    for c in st["cache"]:
        h, wh = slow_lru_hits(ids, E, c["size"], w)
        assert c["hits"] == h and math.isclose(c["hit_rate"], h / st["selections"])
        assert math.isclose(c["weighted_hit_rate"], wh / w[valid].sum())


@pytest.mark.parametrize("dup", [False, True])
def test_one_sequence_uint8_all_valid(rng, dup):
    # the fast paths: every record pairs with the next (views, no gathers) and uint8 sort keys at
    # E = 256 when every id is valid; against the per-definition references
    E, k, R = 256, 6, 300
    ids = np.stack([rng.choice(24, k, replace=False) for _ in range(R)]).astype(np.uint8)
    if dup:
        ids[::7, 3] = ids[::7, 1]  # repeated ids inside records
    st = layer_stats(ids, E, cache_sizes=[3, 6])
    pairs, ov, jac, stab = slow_adjacency(ids.astype(np.int64), E, np.arange(R), np.zeros(R, np.int64))
    assert st["adjacent_pairs"] == pairs == R - 1
    assert math.isclose(st["overlap"], ov) and math.isclose(st["jaccard"], jac)
    assert math.isclose(st["position_stability"], stab)
    for c in st["cache"]:
        assert c["hits"] == slow_lru_hits(ids.astype(np.int64), E, c["size"])[0], c["size"]


def test_k1_no_weights_and_report(rng):
    E = 16
    arr = rng.integers(0, E, (50, 3, 1)).astype(np.uint8)
    rep = analyze(arr, E, hash_layers=[0], source="test", model="tiny")
    assert rep["schema_version"] == 1 and rep["layers"] == 3 and rep["k"] == 1 and rep["records"] == 50
    assert rep["layers_detail"][0]["hash_router"] and not rep["layers_detail"][1]["hash_router"]
    assert rep["layers_detail"][1]["weight"] is None
    assert rep["cache_summary"][-1]["hit_rate"] == pytest.approx(
        sum(x["cache"][-1]["hits"] for x in rep["layers_detail"]) / rep["selections"])
    text = summary_text(rep)
    assert "tiny" in text and "cache summary" in text and len(text.splitlines()) == 2 + 3 + 1
    import json

    json.dumps(rep)  # JSON-able


def test_validation():
    with pytest.raises(ValueError, match="selections"):
        analyze(np.zeros((3, 4)), 8)
    with pytest.raises(ValueError, match="num_experts"):
        analyze(np.zeros((3, 1, 2)), 0)
    with pytest.raises(ValueError, match="positions"):
        analyze(np.zeros((3, 1, 2)), 8, positions=np.arange(4))


def test_command_line_on_a_payload_and_a_capture(tmp_path, rng):
    import json
    import subprocess
    import sys

    from ds4kern.replay import encode_payload

    arr = np.stack([np.stack([rng.choice(64, 6, replace=False) for _ in range(3)]) for _ in range(500)]).astype(np.uint8)
    (tmp_path / "p.json").write_text(json.dumps(encode_payload(arr, start=7)))
    np.save(tmp_path / "c.npy", arr)
    for src in ("p.json", "c.npy"):
        out, png = tmp_path / f"{src}.report.json", tmp_path / f"{src}.png"
        r = subprocess.run([sys.executable, "-m", "ds4kern", "profile", str(tmp_path / src), "--out", str(out),
                            "--png", str(png), "--experts", "64", "--hash-layers", "0", "--cache-sizes", "6",
                            "--model", "tiny"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["records"] == 500 and rep["layers"] == 3 and rep["experts"] == 64 and rep["k"] == 6
        assert rep["layers_detail"][0]["hash_router"] and 6 in rep["cache_sizes"]
        assert rep["layers_detail"][1]["adjacent_pairs"] == 499
        assert "cache summary" in r.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = subprocess.run([sys.executable, "-m", "ds4kern", "profile", str(tmp_path / "c.npy")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--out" in r.stderr



SEL = np.random.default_rng(1).integers(0, 8, (30, 3, 2)).astype(np.uint8)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(cache_sizes=[-1]), ValueError, "cache_sizes"),      # would wrap from the end
    (dict(cache_sizes=[2.5]), TypeError, "cache_sizes"),      # would be truncated to 2
    (dict(cache_sizes=3), TypeError, "cache_sizes"),          # not a sequence
    (dict(top_n=-1), ValueError, "top_n"),                    # would drop the last expert
    (dict(top_n="x"), TypeError, "top_n"),
    (dict(hash_layers=(3,)), ValueError, "hash_layers"),      # beyond the 3 layers
    (dict(hash_layers=(-1,)), ValueError, "hash_layers"),
    (dict(selections=SEL + 0.5), TypeError, "selections"),   # float ids would be truncated
    (dict(selections=SEL.astype(bool)), TypeError, "selections"),
    (dict(positions=np.arange(30) * 0.5), TypeError, "positions"),
    (dict(seq_ids=np.zeros(30)), TypeError, "seq_ids"),
    (dict(weights=np.full(SEL.shape, "a")), TypeError, "weights"),
    (dict(num_experts=True), TypeError, "num_experts"),
    (dict(workers=0), ValueError, "workers"),
    (dict(progress=1), TypeError, "progress"),
])
def test_bad_arguments_name_the_argument(kw, exc, words):
    args = {"selections": SEL, "num_experts": 8, **kw}
    with pytest.raises(exc, match=words):
        analyze(args.pop("selections"), args.pop("num_experts"), **args)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: layer_stats(SEL[:, 0], 8, cache_sizes=[0]), ValueError, "cache_sizes"),
    (lambda: layer_stats(SEL[:, 0], 8, top_n=-2), ValueError, "top_n"),
    (lambda: layer_stats(SEL[:, 0, 0], 8), ValueError, r"ids must have shape \[R, k\]"),
    (lambda: layer_stats(SEL[:, 0], 0), ValueError, "num_experts"),
    (lambda: layer_stats(SEL[:, 0].astype(np.float32), 8), TypeError, "ids"),
    (lambda: layer_stats(SEL[:, 0], 8, positions=np.arange(30.0)), TypeError, "positions"),
    (lambda: stack_distances(SEL[:, 0], -1), ValueError, "num_experts"),
])
def test_layer_functions_check_their_arguments(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_numpy_ints_are_ints():
    rep = analyze(SEL, np.int64(8), hash_layers=np.array([0]), cache_sizes=[np.int32(3)], top_n=np.int64(2))
    assert rep["experts"] == 8 and rep["layers_detail"][0]["hash_router"] and 3 in rep["cache_sizes"]
    assert len(rep["layers_detail"][1]["top_experts"]) == 2

def test_empty_and_single_expert():
    rep = analyze(np.zeros((0, 2, 3), np.uint8), 8)
    assert rep["records"] == 0 and rep["selections"] == 0
    assert all(c["hit_rate"] is None for c in rep["cache_summary"])
    st = layer_stats(np.zeros((5, 1), np.int64), 1)
    assert st["selections"] == 5 and st["entropy"] == 0.0 and st["entropy_ratio"] is None
    assert st["cache"][0]["hits"] == 4 and st["adjacent_pairs"] == 4 and st["overlap"] == 1.0


def test_workers_processes_threads_and_serial_agree(rng, monkeypatch):
    """Layers in forked worker processes, in threads (no fork, or other threads running) and in
    this thread give the same report, progress included."""
    import threading

    import ds4kern.locality.analysis as loc

    R, L, k, E = 3000, 5, 4, 40
    arr = rng.integers(-1, E + 2, (R, L, k)).astype(np.int16)
    w = rng.random((R, L, k)).astype(np.float32)
    pos = np.arange(R) + (np.arange(R) > 1500)  # a gap
    kw = dict(weights=w, positions=pos, hash_layers=(0,), cache_sizes=(3,))
    seen = []
    serial = analyze(arr, E, workers=1, progress=lambda d, t: seen.append((d, t)), **kw)
    assert seen == [(i, L) for i in range(1, L + 1)]
    if loc._can_fork():
        assert threading.active_count() == 1
    forked = analyze(arr, E, workers=3, **kw)
    monkeypatch.setattr(loc, "_can_fork", lambda: False)
    threaded = analyze(arr, E, workers=3, **kw)
    assert forked == serial and threaded == serial
    assert serial["layers_detail"][2]["records"] == R


def test_default_workers_fit_in_memory(monkeypatch):
    import os

    import ds4kern.locality.analysis as loc

    per = loc._scratch_bytes(1_000_000, 6, 256)
    assert 0.6e9 < per < 1.0e9  # ~0.7 GB per million records (the workspace measured ~0.65 GB)
    monkeypatch.setattr(loc, "_available_memory", lambda: 3 * per)
    assert loc._default_workers(1_000_000, 6, 256, 43) == min(2, os.cpu_count() or 1)
    monkeypatch.setattr(loc, "_available_memory", lambda: per // 10)
    assert loc._default_workers(1_000_000, 6, 256, 43) == 1
    monkeypatch.setattr(loc, "_available_memory", lambda: None)
    assert loc._default_workers(1_000_000, 6, 256, 43) == min(16, os.cpu_count() or 1)
    assert loc._default_workers(10, 6, 256, 3) == min(3, os.cpu_count() or 1)
    assert loc._available_memory() is None or loc._available_memory() > 0
