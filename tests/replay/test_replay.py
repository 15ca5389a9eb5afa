"""Routing replay: payload codec, attribution (property tests against the old full-padding
rule), path assembly, the seed's memory bound, and GPU capture."""

import base64
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4kern.replay import assemble_path, attribute_routing, decode_payload, encode_payload


def old_rule(arr, path_len, node_tokens, start=0):
    """The rule the seed replaced: pad the whole payload by one row first, then slice."""
    out = [None] * len(node_tokens)
    if arr is None:
        return out
    off = path_len - start
    needed = off + sum(node_tokens)
    if arr.shape[0] and arr.shape[0] == needed - 1:
        arr = np.concatenate([arr, arr[-1:]])
    for i, n in enumerate(node_tokens):
        end = off + n
        if n and 0 <= off and end <= arr.shape[0]:
            out[i] = arr[off:end].copy()
        off = end
    return out


# ---------------------------------------------------------------- payload codec

@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_roundtrip(rng, dtype):
    a = rng.integers(0, 200, size=(17, 3, 6)).astype(dtype)
    p = encode_payload(a, start=5)
    assert p["dtype"] == dtype and p["shape"] == [17, 3, 6] and p["start"] == 5
    b, start = decode_payload(p)
    np.testing.assert_array_equal(a, b)
    assert start == 5 and b.dtype == np.dtype(dtype)
    b2, _ = decode_payload({"data": p["data"].encode(), "shape": (17, 3, 6), "dtype": dtype})
    np.testing.assert_array_equal(a, b2)


def test_defaults_and_little_endian():
    raw = np.array([[[1, 258]]], "<u2").tobytes()
    arr, start = decode_payload({"data": base64.b64encode(raw), "shape": [1, 1, 2], "dtype": "uint16"})
    assert arr.tolist() == [[[1, 258]]] and start == 0
    arr, start = decode_payload({"data": base64.b64encode(b"\x05\x06"), "shape": [2, 1, 1]})
    assert arr.dtype == np.uint8 and arr.ravel().tolist() == [5, 6]
    arr, _ = decode_payload({"data": "", "shape": [0, 4, 6]})
    assert arr.shape == (0, 4, 6)


GOOD = {"data": base64.b64encode(bytes(24)).decode(), "shape": [2, 3, 4], "dtype": "uint8", "start": 0}


@pytest.mark.parametrize("change,field", [
    ({"data": base64.b64encode(bytes(23)).decode()}, "data"),
    ({"data": "not base64!"}, "data"),
    ({"data": 12}, "data"),
    ({"shape": [2, 3]}, "shape"),
    ({"shape": [2, -3, 4]}, "shape"),
    ({"shape": [2, 3.0, 4]}, "shape"),
    ({"shape": "2,3,4"}, "shape"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": "uint16"}, "data"),  # 24 bytes cannot hold 2*3*4 uint16
    ({"start": -1}, "start"),
    ({"start": "3"}, "start"),
    ({"extra": 1}, "extra"),
])
def test_strict_validation_names_the_field(change, field):
    with pytest.raises((ValueError, TypeError), match=field):
        decode_payload({**GOOD, **change})
    for missing in ("data", "shape"):
        with pytest.raises(ValueError, match=missing):
            decode_payload({k: v for k, v in GOOD.items() if k != missing})


# ---------------------------------------------------------------- attribution

def test_spec_examples():
    arr = np.arange(10 * 2 * 1, dtype=np.uint8).reshape(10, 2, 1)
    # exact fit, reused prefix of 4
    got = attribute_routing(arr, 4, [3, 3])
    np.testing.assert_array_equal(got[0], arr[4:7])
    np.testing.assert_array_equal(got[1], arr[7:10])
    # one short: the final node is padded with the last row
    got = attribute_routing(arr, 4, [3, 4])
    np.testing.assert_array_equal(got[1], np.concatenate([arr[7:], arr[-1:]]))
    # two short: the final node stays unset
    assert attribute_routing(arr, 4, [3, 5])[1] is None
    # zero-length nodes stay unset and do not move the offset
    got = attribute_routing(arr, 4, [0, 3, 0, 4, 0])
    assert got[0] is None and got[2] is None and got[4] is None
    np.testing.assert_array_equal(got[3][-1], arr[-1])
    # negative offset: that node unset, later nodes aligned
    got = attribute_routing(arr, 2, [3, 4], start=4)
    assert got[0] is None
    np.testing.assert_array_equal(got[1], arr[1:5])
    # empty payload never padded; no payload sets nothing
    assert attribute_routing(arr[:0], 0, [1]) == [None]
    assert attribute_routing(None, 0, [3]) == [None]
    # longer payload: extra rows ignored
    got = attribute_routing(arr, 0, [2])
    np.testing.assert_array_equal(got[0], arr[:2])


def test_every_node_owns_its_memory():
    arr = np.arange(24, dtype=np.uint8).reshape(6, 2, 2)
    for n in attribute_routing(arr, 0, [2, 3, 2]):
        assert n is not None and n.flags.owndata and not np.shares_memory(n, arr)


@st.composite
def layouts(draw):
    nodes = draw(st.lists(st.integers(0, 6), min_size=0, max_size=7))
    path_len = draw(st.integers(0, 12))
    start = draw(st.integers(0, 15))
    off = path_len - start
    needed = off + sum(nodes)
    kind = draw(st.sampled_from(["exact", "one_short", "two_short", "longer", "empty", "random", "none"]))
    rows = {"exact": needed, "one_short": needed - 1, "two_short": needed - 2,
            "longer": needed + draw(st.integers(1, 5)), "empty": 0,
            "random": draw(st.integers(0, 30)), "none": None}[kind]
    if rows is not None:
        rows = max(0, rows)
    return nodes, path_len, start, rows


@settings(max_examples=600, deadline=None)
@given(layouts(), st.sampled_from([np.uint8, np.uint16]))
def test_equals_old_rule_node_by_node(layout, dtype):
    nodes, path_len, start, rows = layout
    arr = None if rows is None else np.random.default_rng(rows).integers(0, 250, (rows, 3, 2)).astype(dtype)
    if arr is not None:
        arr.flags.writeable = False  # like a decoded payload
    new = attribute_routing(arr, path_len, nodes, start)
    old = old_rule(arr, path_len, nodes, start)
    assert len(new) == len(old) == len(nodes)
    for a, b in zip(new, old):
        if b is None:
            assert a is None
        else:
            assert a is not None and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
            assert a.flags.owndata and (arr is None or not np.shares_memory(a, arr))
    # assembly is all-or-nothing
    full = assemble_path(new, nodes)
    if any(n and a is None for a, n in zip(new, nodes)) or not any(nodes):
        assert full is None
    else:
        assert full.shape[0] == sum(nodes)


def test_validation_of_arguments():
    arr = np.zeros((3, 1, 1), np.uint8)
    for kw in ({"path_len": -1}, {"start": -2}, {"path_len": 1.5}):
        with pytest.raises(ValueError):
            attribute_routing(arr, kw.get("path_len", 0), [1], kw.get("start", 0))
    with pytest.raises(ValueError, match="node_tokens"):
        attribute_routing(arr, 0, [1, -1])
    with pytest.raises(ValueError, match="arr"):
        attribute_routing(np.zeros((3, 1)), 0, [1])


def test_assemble_path():
    a, b = np.zeros((2, 3, 4), np.uint8), np.ones((3, 3, 4), np.uint8)
    full = assemble_path([a, None, b], [2, 0, 3])
    assert full.shape == (5, 3, 4) and (full[2:] == 1).all()
    assert assemble_path([a, None], [2, 1]) is None
    assert assemble_path([a, b], [2, 4]) is None
    assert assemble_path([], []) is None
    with pytest.raises(ValueError):
        assemble_path([a], [2, 3])


def test_seed_memory_bound():
    """uint8 [1_000_000, 8, 4], 900,000 reused rows, 100,001 new tokens (payload one row short)."""
    arr = np.random.default_rng().integers(0, 256, (1_000_000, 8, 4), dtype=np.uint8)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        got = attribute_routing(arr, 900_000, [100_001])
        cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got[0].nbytes == 3_200_032
    assert cur - base >= 3_200_032
    assert peak - base <= 3.3 * 2**20, f"peak {(peak - base) / 2**20:.2f} MiB"
    np.testing.assert_array_equal(got[0][-2:], arr[-1:].repeat(2, 0))


# ---------------------------------------------------------------- GPU capture

@pytest.mark.gpu
def test_capture_equals_hand_collected_router_outputs(cp, rng):
    import ds4kern
    from ds4kern.replay import RoutingCapture

    E, k, L, hash_layers = 256, 6, 5, (0, 1)
    prompt, steps = 37, 9
    cap = RoutingCapture(max_tokens=prompt + steps, num_layers=L, topk=k, num_experts=E)
    cap.buffer.fill(255)
    vocab = 500
    table = cp.asarray(np.stack([rng.permutation(E)[:k] for _ in range(vocab)]).astype(np.int32))
    bias = [cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32)) for _ in range(L)]
    by_hand = np.zeros((prompt + steps, L, k), np.int64)
    # prefill, then one token at a time (decode), each layer routing into the capture
    chunks = [(0, prompt)] + [(prompt + s, 1) for s in range(steps)]
    for row, T in chunks:
        ids = cp.asarray(rng.integers(0, vocab, T).astype(np.int32))
        for layer in range(L):
            x = cp.asarray(rng.standard_normal((T, E)).astype(np.float32))
            if layer in hash_layers:
                w, i = cap.route_hash(layer, x, table, ids, row=row)
                _, ref = ds4kern.router_hash(x, table, ids, index_dtype="int64")
            else:
                w, i = cap.route(layer, x, row=row, score_function="sqrtsoftplus", expert_bias=bias[layer],
                                 scaling_factor=1.5)
                _, ref = ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias[layer],
                                             scaling_factor=1.5, index_dtype="int64")
            by_hand[row:row + T, layer] = cp.asnumpy(ref)
    total = prompt + steps
    p = cap.payload(total, drop_last=True)
    arr, start = decode_payload(p)
    assert arr.shape == (total - 1, L, k) and arr.dtype == np.uint8 and start == 0
    np.testing.assert_array_equal(arr, by_hand[:-1])
    arr2, start2 = decode_payload(cap.payload(total, start=prompt))
    np.testing.assert_array_equal(arr2, by_hand[prompt:])
    assert start2 == prompt
    # the capture feeds the locality profiler directly
    from ds4kern.locality import analyze

    rep = analyze(cap.rows(total), E, hash_layers=hash_layers)
    ref = analyze(by_hand.astype(np.uint8), E, hash_layers=hash_layers)
    assert rep["layers_detail"] == ref["layers_detail"]


@pytest.mark.gpu
def test_capture_adds_no_kernel_launch(cp, rng):
    """A layer routed into the capture launches exactly what a plain router call launches:
    count the kernel nodes of a CUDA graph captured around each."""
    import ds4kern
    from ds4kern.replay import RoutingCapture

    T, E, k = 64, 256, 6
    cap = RoutingCapture(max_tokens=T, num_layers=3, topk=k, num_experts=E)
    x = cp.asarray(rng.standard_normal((T, E)).astype(np.float32))
    w = cp.empty((T, k), cp.float32)
    i = cp.empty((T, k), cp.uint8)

    def plain():
        ds4kern.router_topk(x, k, score_function="sigmoid", out=(w, i))

    def captured():
        for layer in range(3):
            cap.route(layer, x, weights_out=w, score_function="sigmoid")

    from graph_nodes import count_kernel_nodes

    n_plain = count_kernel_nodes(cp, plain)
    n_cap = count_kernel_nodes(cp, captured)
    assert n_plain == 1 and n_cap == 3, (n_plain, n_cap)
    # a hash-routed layer into the capture: also exactly its own kernel
    table = cp.asarray(np.stack([rng.permutation(E)[:k] for _ in range(100)]).astype(np.int32))
    ids = cp.asarray(rng.integers(0, 100, T).astype(np.int32))
    assert count_kernel_nodes(cp, lambda: cap.route_hash(0, x, table, ids, weights_out=w)) == 1


@pytest.mark.gpu
def test_attribution_on_device_arrays(cp, rng):
    arr = rng.integers(0, 256, (50, 4, 6)).astype(np.uint8)
    for path_len, nodes in ((10, [5, 0, 36]), (10, [5, 35]), (0, [50]), (3, [10, 40])):
        host = attribute_routing(arr, path_len, nodes)
        dev = attribute_routing(cp.asarray(arr), path_len, nodes)
        for h, d in zip(host, dev):
            assert (h is None) == (d is None)
            if h is not None:
                assert isinstance(d, cp.ndarray)
                np.testing.assert_array_equal(cp.asnumpy(d), h)
        full = assemble_path(dev, nodes)
        ref = assemble_path(host, nodes)
        assert (full is None) == (ref is None)
        if ref is not None:
            np.testing.assert_array_equal(cp.asnumpy(full), ref)
