"""Arguments are checked where they enter, the same way in every op and tool: numpy scalars are
the numbers they hold (bools are not numbers), a read-only output is refused by name, and odd
arguments give an error naming them instead of a traceback from deep inside."""

import numpy as np
import pytest

import ds4kern
from ds4kern.core.arrays import BFLOAT16
from ds4kern.locality import analyze, layer_stats
from ds4kern.ops.compressor import init_state
from ds4kern.replay import decode_payload

X = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
SEL = np.random.default_rng(1).integers(0, 8, (20, 2, 2)).astype(np.uint8)


def _decode(**kw):
    a = dict(kv=np.zeros((1, 128), np.float32), score=np.zeros((1, 128), np.float32),
             ape=np.zeros((4, 128), np.float32), norm_w=np.ones(64, np.float32), positions=np.zeros(1, np.int32),
             rope_cos=ds4kern.rope_table(8)[0], rope_sin=ds4kern.rope_table(8)[1])
    ks, ss = init_state(1, 4, 64)
    a.update(kv_state=ks, score_state=ss, cache=np.zeros((1, 2, 64), np.float32))
    a.update(kw)
    return a


def _prefill_args(start):
    a = _decode(kv=np.zeros((1, 3, 128), np.float32), score=np.zeros((1, 3, 128), np.float32))
    return (a["kv"], a["score"], a["ape"], a["norm_w"], start, a["rope_cos"], a["rope_sin"], a["kv_state"],
            a["score_state"], a["cache"])


@pytest.mark.parametrize("call", [
    lambda n, f: ds4kern.router_topk(X, n(2), scaling_factor=f(1.5), num_groups=n(2), group_topk=n(1)),
    lambda n, f: ds4kern.router_topk_dense(X, n(2), score_function="sigmoid", scaling_factor=f(1.5)),
    lambda n, f: ds4kern.router_topk_backward(X, X, topk=n(2), routing_map=X > 0, scaling_factor=f(2.0)),
    lambda n, f: ds4kern.router_aux_scores(X, n(2)),
    lambda n, f: ds4kern.router_aux_loss(X, np.ones(16), topk=n(2), coeff=f(0.01), num_tokens=n(6)),
    lambda n, f: ds4kern.router_aux_loss_backward(f(1.0), X, np.ones(16), topk=n(2), coeff=f(0.01)),
    lambda n, f: ds4kern.compress_decode(**_decode(), ratio=n(4), eps=f(1e-6)),
    lambda n, f: ds4kern.compress_prefill(*_prefill_args(n(0)), ratio=n(4), eps=f(1e-6)),
    lambda n, f: ds4kern.rope_table(n(8), dim=n(64), theta=f(1e4), yarn_factor=f(4.0), original_max_pos=n(4)),
    lambda n, f: init_state(n(2), n(4), n(64)),
    lambda n, f: analyze(SEL, n(8), hash_layers=[n(0)], cache_sizes=[n(3)], top_n=n(2), workers=n(1)),
    lambda n, f: layer_stats(SEL[:, 0], n(8), cache_sizes=(n(3),), top_n=n(1)),
], ids=["router_topk", "router_topk_dense", "router_topk_backward", "router_aux_scores", "router_aux_loss",
        "router_aux_loss_backward", "compress_decode", "compress_prefill", "rope_table", "init_state", "analyze",
        "layer_stats"])
def test_numpy_scalars_are_numbers(call):
    call(int, float)  # the Python numbers
    call(np.int64, np.float32)  # the same as numpy scalars


def test_numpy_int_repeat_for_autotune(monkeypatch):
    from ds4kern.core import autotune

    monkeypatch.setitem(autotune._state, "repeat", autotune._state["repeat"])  # restored afterwards
    ds4kern.autotune.enable(False, repeat=np.int64(3))
    assert autotune._state["repeat"] == 3 and type(autotune._state["repeat"]) is int


@pytest.mark.parametrize("call,words", [
    (lambda: ds4kern.router_topk(X, True), "topk"),
    (lambda: ds4kern.router_topk_dense(X, np.True_), "topk"),
    (lambda: ds4kern.router_aux_scores(X, True), "topk"),
    (lambda: ds4kern.router_aux_loss(X, np.ones(16), topk=2, coeff=np.True_), "coeff"),
    (lambda: ds4kern.router_topk_backward(X, X, topk=2, routing_map=X > 0, use_pre_softmax="no"), "use_pre_softmax"),
    (lambda: analyze(SEL, True), "num_experts"),
    (lambda: ds4kern.compress_decode(**_decode(), ratio=4, eps=True), "eps"),
])
def test_bools_are_not_numbers(call, words):
    with pytest.raises(TypeError, match=words):
        call()


def _ro(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("call,name", [
    (lambda: ds4kern.router_topk(X, 2, out=(_ro(np.zeros((6, 2), np.float32)), None)), r"out\[0\] \(weights\)"),
    (lambda: ds4kern.router_topk(X, 2, out=(None, _ro(np.zeros((6, 2), np.int32)))), r"out\[1\] \(indices\)"),
    (lambda: ds4kern.router_hash(X, np.zeros((4, 2), np.int32), np.zeros(6, np.int32),
                                 out=(_ro(np.zeros((6, 2), np.float32)), None)), r"out\[0\] \(weights\)"),
    (lambda: ds4kern.router_topk_dense(X, 2, topk_indices=_ro(np.zeros((6, 2), np.int32))), "topk_indices"),
    (lambda: ds4kern.compress_decode(**_decode(cache=_ro(np.zeros((1, 2, 64), np.float32))), ratio=4), "cache"),
    (lambda: ds4kern.sparse_attention(np.zeros((1, 1, 512), BFLOAT16), np.zeros((3, 512), BFLOAT16),
                                      np.zeros((1, 2), np.int32), np.zeros(1, np.float32),
                                      out=_ro(np.zeros((1, 1, 512), BFLOAT16))), "out"),
    (lambda: ds4kern.pack_kv_fp8(np.zeros((3, 512), BFLOAT16), out=_ro(np.zeros((3, 584), np.uint8))), "out"),
    (lambda: ds4kern.hc_post(np.zeros((1, 8), np.float32), np.zeros((1, 4, 8), np.float32),
                             np.zeros((1, 4), np.float32), np.zeros((1, 4, 4), np.float32),
                             out=_ro(np.zeros((1, 4, 8), np.float32))), "out"),
])
def test_read_only_outputs_are_refused_by_name(call, name):
    with pytest.raises(ValueError, match=rf"{name} is read-only"):
        call()


@pytest.mark.parametrize("call,exc,words", [
    (lambda: layer_stats(SEL[:, 0, 0], 8), ValueError, "ids must have shape"),  # was: not enough values to unpack
    (lambda: analyze(SEL, 8, cache_sizes=3), TypeError, "cache_sizes"),  # was: 'int' object is not iterable
    (lambda: analyze(SEL, 8, workers=2.5), TypeError, "workers"),  # was: raised inside multiprocessing
    (lambda: analyze(SEL, 8, top_n="x"), TypeError, "top_n"),  # was: invalid literal for int()
    (lambda: decode_payload({"data": "", "shape": [0, 1, 1], "dtype": []}), ValueError, "dtype"),  # was: unhashable
    (lambda: init_state(-2, 4, 64), ValueError, "batch"),  # was: negative dimensions are not allowed
    (lambda: init_state(2, 5, 64), ValueError, "ratio"),  # was: a state of the wrong shape
    (lambda: ds4kern.router_aux_loss(np.ones((0, 8), np.float32), np.ones(8), topk=2, coeff=1.0), ValueError,
     "probs has no rows"),  # was: "num_tokens must be a positive int, got None"
    (lambda: ds4kern.replay.attribute_routing([[[1]]], 0, [1]), TypeError, "arr must be a numpy or CuPy array"),
])
def test_odd_arguments_name_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_more_names_and_counts_are_checked():
    """A float ratio, an unknown op name in variants(), a dict that is not a report: errors naming
    the argument instead of a silent 4 / an empty list / a KeyError."""
    from ds4kern.locality import summary_text
    from ds4kern.ops.compressor import compress_decode

    with pytest.raises(ValueError, match="unknown op 'nope'"):
        ds4kern.variants("nope")
    with pytest.raises(ValueError, match="report must be a locality report"):
        summary_text({})
    B, d = 2, 128
    kv_state, score_state = init_state(B, 4, d)
    kv = np.ones((B, 2 * d), np.float32)
    cos, sin = ds4kern.rope_table(64)
    with pytest.raises(ValueError, match=r"ratio must be 4 \(CSA\) or 128 \(HCA\), got 4.0"):
        compress_decode(kv, kv, np.zeros((4, 2 * d), np.float32), np.ones(d, np.float32), np.array([0, 1]), cos, sin,
                        kv_state, score_state, np.zeros((B, 16, d), np.float32), ratio=4.0)
