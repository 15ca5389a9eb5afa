"""DeepSeek-V4 attention block (decode) at the small config against the float64 reference built
from each sequence's history: every layer kind, past the window wrap-around (128), across
compressed-row boundaries (every 4th / 128th token), first tokens included; refused calls change
nothing; the block's memory scopes."""

import numpy as np
import pytest

from ds4kern.core import scope as S
from ds4kern.models.deepseek_v4 import LayerState, attention_decode, random_attention_weights, small
from ds4kern.models.deepseek_v4.reference import ReferenceAttention

TOL = 1e-2  # relative to the step's largest |X_new|: bf16 storage (q, KV rows, o, y) computed in float32 vs float64


def run_steps(cfg, kind, B, steps, seed, xp=np):
    w = random_attention_weights(cfg, kind, seed)
    st = LayerState(cfg, kind, B, xp=xp)
    ref = ReferenceAttention(cfg, w, B)
    wx = w.to(xp)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for p in range(steps):
        X = rng.standard_normal((B, 4, cfg.dim)).astype(np.float32)
        got = attention_decode(cfg, wx, st, xp.asarray(X), np.full(B, p))
        sel = None if st.last_selected is None else (st.last_selected if xp is np else st.last_selected.get())
        want = ref.step(X, selected=sel)
        got = np.asarray(got if xp is np else got.get(), np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < TOL, f"{kind} step {p}: relative error {err:.3g}"
        worst = max(worst, err)
    return worst, ref.ties


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_decode_matches_reference(kind):
    worst, ties = run_steps(small(512), kind, 2, 134, seed=3)
    print(f"{kind}: worst relative error {worst:.2e}, indexer near-tie steps {ties}")


def make(kind="csa", B=2):
    cfg = small(256)
    return cfg, random_attention_weights(cfg, kind, 0), LayerState(cfg, kind, B)


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8), err_msg=k)


@pytest.mark.parametrize("case,match", [
    ("skip", r"positions\[1\] = 2, but sequence 1's cache holds positions 0 \.\. 0"),
    ("beyond", r"beyond the configured max_context 256"),
    ("shape", r"X must have shape \[B, 4, D\]"),
    ("pos_shape", r"positions must be integers of shape \[B\]"),
    ("kind", r"weights are for a 'hca' layer, the state for a 'csa' layer"),
])
def test_refused_calls_change_nothing(case, match):
    cfg, w, st = make()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 4, cfg.dim)).astype(np.float32)
    attention_decode(cfg, w, st, X, np.array([0, 0]))
    before = st.snapshot()
    args = dict(X=X, positions=np.array([1, 1]), w=w)
    if case == "skip":
        args["positions"] = np.array([1, 2])
    elif case == "beyond":
        st.next_pos[:] = 256
        before = st.snapshot()
        args["positions"] = np.array([256, 256])
    elif case == "shape":
        args["X"] = X[:1]
    elif case == "pos_shape":
        args["positions"] = np.array([1.0, 1.0])
    else:
        args["w"] = random_attention_weights(cfg, "hca", 0)
    with pytest.raises(ValueError, match=match):
        attention_decode(cfg, args["w"], st, args["X"], args["positions"])
    same_state(before, st.snapshot())


def test_scopes_of_the_block(tmp_path, monkeypatch):
    monkeypatch.delenv(S.ENV, raising=False)
    S.refresh()
    path = tmp_path / "s.jsonl"
    cfg, w, st = make("csa")
    S.set_stats_path(str(path))
    try:
        attention_decode(cfg, w, st, np.ones((2, 4, cfg.dim), np.float32), np.array([0, 0]))
    finally:
        S.set_stats_path(None)
    paths = {r["path"] for r in S.read_stats(path)}
    for want in ("attention", "attention/hc_pre", "attention/q", "attention/kv", "attention/indexer",
                 "attention/indexer/compress_decode", "attention/indexer/indexer_topk",
                 "attention/compressor/compress_decode",
                 "attention/sparse_attention", "attention/output", "attention/hc_post"):
        assert want in paths, (want, sorted(paths))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_decode_on_the_gpu_matches_reference(cp, kind):
    worst, ties = run_steps(small(512), kind, 3, 134, seed=5, xp=cp)
    print(f"{kind}: worst relative error {worst:.2e}, indexer near-tie steps {ties}")


def test_fill_random_then_decode_at_a_long_context():
    cfg = small(1024)
    st = LayerState(cfg, "hca", 2).fill_random([700, 300], seed=1)
    w = random_attention_weights(cfg, "hca", 1)
    X = np.random.default_rng(0).standard_normal((2, 4, cfg.dim)).astype(np.float32)
    out = attention_decode(cfg, w, st, X, np.array([700, 300]))
    assert np.isfinite(out.astype(np.float32)).all() and list(st.next_pos) == [701, 301]
    with pytest.raises(ValueError, match="positions must be 2 integers"):
        st.fill_random([1024, 0])
