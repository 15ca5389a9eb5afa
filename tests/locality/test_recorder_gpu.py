"""Online locality recording on the GPU equals offline analysis of the same selections."""

import numpy as np
import pytest

import ds4kern
from ds4kern.locality import analyze

pytestmark = pytest.mark.gpu


def stream(rng, E, k, steps=40, seqs=12, bad=0.02):
    """A decode-like stream: each step a few sequences (one record each, some with a skipped
    position), plus one prefill chunk; invalid ids sprinkled.  Returns per-call records."""
    pos = rng.integers(0, 50, seqs)
    calls = []
    for step in range(steps):
        if step == steps // 2:  # a prefill chunk of one sequence: contiguous, increasing
            s = int(rng.integers(0, seqs))
            n = 77
            p = pos[s] + np.arange(n)
            pos[s] += n
            sq = np.full(n, s)
        else:
            live = np.sort(rng.choice(seqs, size=int(rng.integers(1, seqs + 1)), replace=False))
            gap = rng.random(len(live)) < 0.1
            pos[live] += gap
            p = pos[live].copy()
            pos[live] += 1
            sq = live
        T = len(p)
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
        hot = rng.random((T, k)) < 0.5  # some locality: reuse a small hot set
        ids[hot] = rng.integers(0, min(E, 8), hot.sum())
        ids[rng.random((T, k)) < bad] = -1
        ids[rng.random((T, k)) < bad] = E + 3
        w = rng.random((T, k)).astype(np.float32)
        calls.append((ids, w, p.astype(np.int64), sq.astype(np.int64)))
    return calls


def offline(base, L, E, layer_calls, cache_sizes=(3,)):
    ids = np.stack([np.concatenate([c[0] for c in layer_calls[layer]]) for layer in range(L)], axis=1)
    w = np.stack([np.concatenate([c[1] for c in layer_calls[layer]]) for layer in range(L)], axis=1)
    pos = np.concatenate([c[2] for c in base])
    seq = np.concatenate([c[3] for c in base])
    return analyze(ids, E, weights=w, positions=pos, seq_ids=seq, hash_layers=(0,), cache_sizes=cache_sizes,
                   source="online")


def compare(on, off):
    assert on["selections"] == off["selections"] and on["cache_sizes"] == off["cache_sizes"]
    assert on["cache_summary"] == off["cache_summary"]
    for a, b in zip(on["layers_detail"], off["layers_detail"]):
        for key in ("records", "selections", "hash_router", "unique_experts", "entropy", "entropy_ratio", "hist",
                    "adjacent_pairs", "overlap", "jaccard", "position_stability"):
            assert a[key] == b[key], (a["layer"], key, a[key], b[key])
        for ca, cb in zip(a["cache"], b["cache"]):
            assert (ca["size"], ca["hits"], ca["hit_rate"]) == (cb["size"], cb["hits"], cb["hit_rate"])
            if cb["weighted_hit_rate"] is None:
                assert ca["weighted_hit_rate"] is None
            else:
                assert ca["weighted_hit_rate"] == pytest.approx(cb["weighted_hit_rate"], rel=1e-9)
        if b["weight"] is None:
            assert a["weight"] is None
        else:
            np.testing.assert_allclose(a["weight"], b["weight"], rtol=1e-9)
        assert [t["id"] for t in a["top_experts"]] == [t["id"] for t in b["top_experts"]]


@pytest.mark.parametrize("E,k,idx_dtype", [(256, 6, np.int32), (64, 1, np.int64), (500, 8, np.int16),
                                           (200, 6, np.uint8)])
def test_recording_equals_offline(cp, rng, E, k, idx_dtype):
    L = 3
    base = stream(rng, E, k)
    # every layer sees the same records (positions, sequences); its ids are a layer-specific remap
    layer_calls = []
    for layer in range(L):
        calls = []
        for ids, w, p, sq in base:
            valid = (ids >= 0) & (ids < E)
            calls.append((np.where(valid, (ids * (layer + 1) + 3 * layer) % E, ids), w, p, sq))
        layer_calls.append(calls)
    rec = ds4kern.LocalityRecorder(L, E, k, cache_sizes=(3,), hash_layers=(0,), max_sequences=16)
    for j, b in enumerate(base):
        for layer in range(L):
            ids, w, p, s = layer_calls[layer][j]
            ids_d = cp.asarray(np.where(ids < 0, 255, ids).astype(idx_dtype) if idx_dtype == np.uint8
                               else ids.astype(idx_dtype))
            rec.record(layer, ids_d, weights=cp.asarray(w), positions=cp.asarray(p), seq_ids=cp.asarray(s.astype(np.int32)))
    on = rec.report()
    if idx_dtype == np.uint8:  # what the device saw: -1 became 255 (invalid either way)
        layer_calls = [[(np.where(c[0] < 0, 255, c[0]), *c[1:]) for c in lc] for lc in layer_calls]
    off = offline(base, L, E, layer_calls)
    compare(on, off)
    assert on["layers_detail"][0]["adjacent_pairs"] > 100


def test_strided_capture_slice_and_two_launches(cp, rng):
    from graph_nodes import count_kernel_nodes

    E, k, T, L = 256, 6, 700, 2
    buf = cp.asarray(rng.integers(0, E, (T, L, k)).astype(np.uint8))
    off = analyze(cp.asnumpy(buf), E)
    # records per part (one warp each, 8 a block: the stack carried over 32-key sub-segments, past
    # the block's earlier parts, and the walk back over earlier blocks)
    for part in (None, 1, 3, 8, 16, 21, 64, 100, 128, 700):
        rec = ds4kern.LocalityRecorder(L, E, k)
        rec._records_per_part = part
        for part in (slice(0, 100), slice(100, T)):  # two steps: the second also reaches into the first
            for layer in range(L):
                rec.record(layer, buf[part, layer, :])
        compare(rec.report(), off)
    rec2 = ds4kern.LocalityRecorder(L, E, k)
    # captured into a graph: nothing synchronises, and one record is two kernels
    assert count_kernel_nodes(cp, lambda: rec2.record(0, buf[:, 0, :])) == 2


@pytest.mark.parametrize("E,k,idx_dtype,split", [(256, 6, np.uint8, False), (64, 1, np.int64, True),
                                                 (500, 8, np.int16, False), (256, 6, np.int32, True)])
def test_record_step_equals_offline(cp, rng, E, k, idx_dtype, split):
    """One step's layers in one record_step call (a strided [T, layers, k] capture-like buffer)
    counts exactly what per-layer recording / the offline analysis counts; with ``split``, layer 0
    goes through record() and layers 1.. through record_step(first_layer=1)."""
    from graph_nodes import count_kernel_nodes

    L = 4
    base = stream(rng, E, k, steps=30)
    layer_calls = []
    for layer in range(L):
        calls = []
        for ids, w, p, sq in base:
            valid = (ids >= 0) & (ids < E)
            ids = np.where(valid, (ids * (2 * layer + 1) + 5 * layer) % E, ids)
            if idx_dtype == np.uint8:  # what the device sees (E=256: every uint8 id is valid)
                ids = np.where(ids < 0, 255, ids).astype(np.uint8).astype(np.int64)
            calls.append((ids, (w * (layer + 1)).astype(np.float32), p, sq))
        layer_calls.append(calls)
    rec = ds4kern.LocalityRecorder(L, E, k, cache_sizes=(3,), hash_layers=(0,), max_sequences=16)
    if split:  # the 77-record prefill spans parts and blocks of parts
        rec._records_per_part = 5
    for j, (_, _, p, s) in enumerate(base):
        T = len(p)
        # a capture-like buffer with one spare layer and a column gap: strided in every dimension
        buf = cp.full((T, L + 1, k + 1), -7, dtype=idx_dtype) if idx_dtype != np.uint8 else \
            cp.full((T, L + 1, k + 1), 250, dtype=idx_dtype)
        wbuf = cp.full((T, L + 1, k + 1), np.nan, cp.float32)
        for layer in range(L):
            buf[:, layer, :k] = cp.asarray(layer_calls[layer][j][0].astype(idx_dtype))
            wbuf[:, layer, :k] = cp.asarray(layer_calls[layer][j][1])
        pos_d, seq_d = cp.asarray(p), cp.asarray(s.astype(np.int32))
        if split:
            rec.record(0, buf[:, 0, :k], weights=wbuf[:, 0, :k], positions=pos_d, seq_ids=seq_d)
            rec.record_step(buf[:, 1:L, :k], weights=wbuf[:, 1:L, :k], positions=pos_d, seq_ids=seq_d, first_layer=1)
        else:
            rec.record_step(buf[:, :L, :k], weights=wbuf[:, :L, :k], positions=pos_d, seq_ids=seq_d)
    on = rec.report()
    off = offline(base, L, E, layer_calls)
    compare(on, off)
    assert on["layers_detail"][2]["adjacent_pairs"] > 100
    rec2 = ds4kern.LocalityRecorder(L, E, k)
    assert count_kernel_nodes(cp, lambda: rec2.record_step(buf[:, :L, :k])) == 2


def test_record_step_overlap_equals_offline(cp, rng):
    """record_step(overlap=True) on the recorder's stream, fed from step_buffers(): the same counts
    as the offline analysis, though the positions array is rewritten right after each call and a
    plain record_step (own buffer) and record() calls come in between."""
    E, k, L = 256, 6, 3
    base = stream(rng, E, k, steps=24)
    layer_calls = [[(np.where((ids >= 0) & (ids < E), (ids * (2 * x + 1) + 3 * x) % E, 255), w * (x + 1), p, sq)
                    for ids, w, p, sq in base] for x in range(L)]
    rec = ds4kern.LocalityRecorder(L, E, k, cache_sizes=(3,), hash_layers=(0,), max_sequences=16)
    pos_d = cp.empty(128, cp.int64)
    for j, (_, _, p, sq) in enumerate(base):
        T = len(p)
        ids = np.stack([layer_calls[x][j][0] for x in range(L)], axis=1).astype(np.uint8)
        w = np.stack([layer_calls[x][j][1] for x in range(L)], axis=1).astype(np.float32)
        pos_d[:T] = cp.asarray(p)
        seq_d = cp.asarray(sq.astype(np.int32))
        if j % 7 == 3:  # a plain call on the current stream, own buffers
            rec.record_step(cp.asarray(ids), weights=cp.asarray(w), positions=pos_d[:T], seq_ids=seq_d)
        elif j % 7 == 5:  # per-layer calls
            for x in range(L):
                rec.record(x, cp.asarray(ids[:, x]), weights=cp.asarray(w[:, x]), positions=pos_d[:T], seq_ids=seq_d)
        else:
            bi, bw = rec.step_buffers(T)
            bi[...] = cp.asarray(ids)
            bw[...] = cp.asarray(w)
            rec.record_step(bi, weights=bw, positions=pos_d[:T], seq_ids=seq_d, overlap=True)
        pos_d.fill(-12345)  # the recording must have copied the positions
    layer_calls = [[(c[0].astype(np.int64), c[1].astype(np.float32), c[2], c[3]) for c in calls]
                   for calls in layer_calls]
    compare(rec.report(), offline(base, L, E, layer_calls))


def test_record_step_overlap_needs_step_buffers(cp):
    from graph_nodes import count_kernel_nodes

    rec = ds4kern.LocalityRecorder(2, 64, 4)
    with pytest.raises(ValueError, match="step_buffers"):
        rec.record_step(cp.zeros((5, 2, 4), cp.int32), overlap=True)
    bi, bw = rec.step_buffers(5)
    assert bi.dtype == np.uint8 and bi.shape == (5, 2, 4) and bw.dtype == np.float32
    with pytest.raises(ValueError, match="step_buffers"):  # weights from elsewhere
        rec.record_step(bi, weights=cp.zeros((5, 2, 4), cp.float32), overlap=True)
    assert rec.has_weights == [False, False] and rec.records == [0, 0]  # a refused call changes nothing
    bi2, _ = rec.step_buffers(5)
    assert bi2.data.ptr != bi.data.ptr and rec.step_buffers(5)[0].data.ptr == bi.data.ptr  # two in turn
    with pytest.raises(ValueError, match="dtype"):
        rec.step_buffers(5, np.float32)
    with pytest.raises(ValueError, match="cannot hold"):
        ds4kern.LocalityRecorder(1, 300, 4).step_buffers(5, np.uint8)
    bi.fill(1)
    rec.join()

    def captured():  # in a graph: forked onto the recorder's stream and joined before the end
        rec.record_step(bi, overlap=True)
        rec.join()

    assert count_kernel_nodes(cp, captured) == 2
    assert rec.report()["layers_detail"][0]["hist"][1] > 0


def test_record_step_validation(cp):
    rec = ds4kern.LocalityRecorder(3, 64, 4)
    with pytest.raises(ValueError, match="shape"):
        rec.record_step(cp.zeros((5, 4), cp.int32))
    with pytest.raises(ValueError, match="layers"):
        rec.record_step(cp.zeros((5, 3, 4), cp.int32), first_layer=1)
    with pytest.raises(ValueError, match="first_layer"):
        rec.record_step(cp.zeros((5, 1, 4), cp.int32), first_layer=3)
    with pytest.raises(ValueError, match="weights"):
        rec.record_step(cp.zeros((5, 3, 4), cp.int32), weights=cp.zeros((5, 2, 4), cp.float32))
    rec.record(0, cp.zeros((5, 4), cp.int32))
    with pytest.raises(ValueError, match="equally often"):
        rec.record_step(cp.zeros((5, 3, 4), cp.int32))
    rec.record_step(cp.ones((5, 2, 4), cp.int32), first_layer=1)  # layers 1, 2: equal so far
    assert rec.records == [5, 5, 5]


def test_validation(cp):
    rec = ds4kern.LocalityRecorder(2, 64, 4)
    with pytest.raises(ValueError, match="layer"):
        rec.record(2, cp.zeros((3, 4), cp.int32))
    with pytest.raises(ValueError, match="indices"):
        rec.record(0, cp.zeros((3, 5), cp.int32))
    with pytest.raises(TypeError, match="GPU"):
        rec.record(0, np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="weights"):
        rec.record(0, cp.zeros((3, 4), cp.int32), weights=cp.zeros((3, 4), cp.float64))
    with pytest.raises(ValueError, match="num_experts"):
        ds4kern.LocalityRecorder(1, 513, 4)
    big = ds4kern.LocalityRecorder(1, 512, 32)  # the largest configuration
    ids = cp.asarray(np.random.default_rng(5).integers(-1, 512, (300, 1, 32)).astype(np.int32))
    big.record(0, ids[:, 0])
    compare(big.report(), analyze(cp.asnumpy(ids), 512))


def test_adjacency_without_staged_ids(cp, rng, monkeypatch):
    """Blocks too large to keep their parts' ids in shared memory read them from the ids again."""
    import ds4kern.locality.recorder as r

    monkeypatch.setattr(r, "_STAGE_SMEM", 0)
    E, k = 256, 6
    base = stream(rng, E, k, steps=20)
    calls = [[(ids, w, p, sq) for ids, w, p, sq in base]]
    rec = ds4kern.LocalityRecorder(1, E, k, cache_sizes=(3,), hash_layers=(0,), max_sequences=16)
    for part in (None, 5):
        rec.reset()
        rec._records_per_part = part
        for ids, w, p, sq in base:
            rec.record(0, cp.asarray(ids), weights=cp.asarray(w), positions=cp.asarray(p), seq_ids=cp.asarray(sq))
        compare(rec.report(), offline(base, 1, E, calls))


def test_weight_sums_any_float(cp, rng):
    """Weights of any size and sign (fixed point within a block, float64 beyond it) sum as in
    float64; a NaN weight makes the sums it enters NaN on both sides."""
    import math

    E, k, T = 64, 4, 700
    ids = rng.integers(0, E, (T, 1, k)).astype(np.int32)
    w = rng.random((T, 1, k)).astype(np.float32)
    w[::7, 0, 0] = -w[::7, 0, 0]
    w[::11, 0, 1] = 5000.0 + w[::11, 0, 1] * 1e5  # above the fixed-point range
    w[::13, 0, 2] = 1e-12 * (1 + w[::13, 0, 2])  # below its range
    w[::17, 0, 3] = 0.0
    w[5, 0, 3] = 4095.99
    rec = ds4kern.LocalityRecorder(1, E, k, cache_sizes=(3,))
    rec._records_per_part = 16  # several blocks
    rec.record_step(cp.asarray(ids), weights=cp.asarray(w))
    compare(rec.report(), analyze(ids, E, weights=w, cache_sizes=(3,), source="online"))
    w[100, 0, 0] = np.nan
    rec.reset()
    rec.record_step(cp.asarray(ids), weights=cp.asarray(w))
    on, off = rec.report(), analyze(ids, E, weights=w, cache_sizes=(3,), source="online")
    e = int(ids[100, 0, 0])
    assert math.isnan(on["layers_detail"][0]["weight"][e]) and math.isnan(off["layers_detail"][0]["weight"][e])


@pytest.mark.parametrize("E,k", [(256, 6), (40, 3), (512, 8)])
def test_long_parts_with_locality(cp, rng, E, k):
    """Parts of many 32-slot sub-segments (the part's last-access marks and rank bitmap carried
    across them, more than 32 words of marks for the longest) on a skewed stream: a hot set
    reused within and across sub-segments, repeated ids within a record, invalid ids, weights."""
    T, L = 1500, 2
    ids = rng.integers(0, E, (T, L, k)).astype(np.int32)
    hot = rng.random((T, L, k)) < 0.6
    ids[hot] = rng.integers(0, min(E, 12), int(hot.sum()))
    ids[rng.random((T, L, k)) < 0.02] = -1
    ids[rng.random((T, L, k)) < 0.02] = E
    w = rng.random((T, L, k)).astype(np.float32)
    off = analyze(ids, E, weights=w, cache_sizes=(3, 5), source="online")
    for part in (None, 6, 40, 250, 1500):
        rec = ds4kern.LocalityRecorder(L, E, k, cache_sizes=(3, 5))
        rec._records_per_part = part
        for sl in (slice(0, 333), slice(333, T)):
            rec.record_step(cp.asarray(ids[sl]), weights=cp.asarray(w[sl]))
        compare(rec.report(), off)


def test_wide_ids_out_of_range_are_invalid(cp):
    """int64 ids beyond the int32 range (2^32 + e) are invalid, not e."""
    E, k = 64, 4
    ids = np.random.default_rng(3).integers(0, E, (50, k)).astype(np.int64)
    ids[::3, 1] += 1 << 32
    ids[::5, 2] = -(1 << 40)
    rec = ds4kern.LocalityRecorder(1, E, k)
    rec.record(0, cp.asarray(ids))
    on, off = rec.report(), analyze(ids[:, None, :], E)
    compare(on, off)
    assert on["selections"] == int(((ids >= 0) & (ids < E)).sum())


def test_shared_memory_limit_is_checked(cp, monkeypatch):
    import ds4kern.locality.recorder as r

    monkeypatch.setattr(r, "_smem_optin", lambda attrs: 32 * 1024)
    with pytest.raises(ValueError, match="num_experts=512 with topk=32 needs"):
        ds4kern.LocalityRecorder(1, 512, 32)
    ds4kern.LocalityRecorder(1, 64, 4)  # small enough
