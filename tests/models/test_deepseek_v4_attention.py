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


def prefill_then_decode(cfg, kind, chunks, total, seed, xp=np):
    """Outputs of prefill chunks then decode steps, the decode-only outputs, and the float64
    reference's, for one sequence."""
    from ds4kern.models.deepseek_v4 import attention_prefill

    w = random_attention_weights(cfg, kind, seed)
    wx = w.to(xp)
    Xs = np.random.default_rng(seed).standard_normal((total, 1, 4, cfg.dim)).astype(np.float32)
    a, b = LayerState(cfg, kind, 1, xp=xp), LayerState(cfg, kind, 1, xp=xp)
    host = (lambda v: v) if xp is np else (lambda v: v.get())
    dec = [host(attention_decode(cfg, wx, a, xp.asarray(Xs[p]), np.array([p])))[0] for p in range(total)]
    got, p = [], 0
    for n in chunks:
        got += list(host(attention_prefill(cfg, wx, b, xp.asarray(Xs[p:p + n, 0]))))
        p += n
    got += [host(attention_decode(cfg, wx, b, xp.asarray(Xs[q]), np.array([q])))[0] for q in range(p, total)]
    ref = ReferenceAttention(cfg, w, 1)
    want = [ref.step(Xs[q])[0] for q in range(total)] if kind != "csa" else None
    return np.array(got, np.float64), np.array(dec, np.float64), want


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_prefill_then_decode_equals_decode_alone(kind):
    """Chunks of 70 and 60 tokens (70 is not a multiple of 4; 130 passes the window and the first
    HCA row), then 10 decode steps, against 140 decode steps and (SWA / HCA) the float64 reference."""
    got, dec, want = prefill_then_decode(small(512), kind, [70, 60], 140, seed=4)
    err = np.abs(got - dec).max(axis=(1, 2)) / np.abs(dec).max(axis=(1, 2))
    assert err.max() < TOL, (int(err.argmax()), float(err.max()))
    if want is not None:
        want = np.array(want)
        err = np.abs(got - want).max(axis=(1, 2)) / np.abs(want).max(axis=(1, 2))
        assert err.max() < TOL, (int(err.argmax()), float(err.max()))


def test_refused_prefill_changes_nothing():
    from ds4kern.models.deepseek_v4 import attention_prefill

    cfg, w, st = make("hca", B=2)
    X = np.random.default_rng(0).standard_normal((5, 4, cfg.dim)).astype(np.float32)
    attention_prefill(cfg, w, st, X, seq=1)
    assert list(st.next_pos) == [0, 5]
    before = st.snapshot()
    for kwargs, match in [(dict(seq=2), "seq must be a sequence of the state"),
                          (dict(X=np.zeros((300, 4, cfg.dim), np.float32)), "beyond the configured max_context"),
                          (dict(X=X[:, :2]), r"X must have shape \[T >= 1, 4, D"),
                          (dict(w=random_attention_weights(cfg, "csa", 0)), "weights are for a 'csa' layer")]:
        args = dict(X=X, seq=1, w=w)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            attention_prefill(cfg, args["w"], st, args["X"], seq=args["seq"])
        same_state(before, st.snapshot())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_prefill_on_the_gpu(cp, kind):
    got, dec, want = prefill_then_decode(small(512), kind, [70, 60], 140, seed=6, xp=cp)
    err = np.abs(got - dec).max(axis=(1, 2)) / np.abs(dec).max(axis=(1, 2))
    assert err.max() < TOL, (int(err.argmax()), float(err.max()))


@pytest.mark.parametrize("kind", ["swa", "hca", "csa"])
def test_mixed_positions_in_one_decode_batch(kind):
    """Two sequences prefilled to different lengths (70 and 133: past the window and the first
    HCA row) decode together at positions [70, 133] .. ; each equals the same sequence run alone."""
    from ds4kern.models.deepseek_v4 import attention_prefill

    cfg = small(512)
    w = random_attention_weights(cfg, kind, 7)
    rng = np.random.default_rng(7)
    lens, steps = (70, 133), 4
    pre = [rng.standard_normal((n, 4, cfg.dim)).astype(np.float32) for n in lens]
    dec = rng.standard_normal((steps, 2, 4, cfg.dim)).astype(np.float32)
    both = LayerState(cfg, kind, 2)
    for b in range(2):
        attention_prefill(cfg, w, both, pre[b], seq=b)
    got = [attention_decode(cfg, w, both, dec[s], both.next_pos.copy()) for s in range(steps)]
    for b in range(2):
        alone = LayerState(cfg, kind, 1)
        attention_prefill(cfg, w, alone, pre[b])
        for s in range(steps):
            want = attention_decode(cfg, w, alone, dec[s, b:b + 1], alone.next_pos.copy())
            a, e = got[s][b].astype(np.float64), want[0].astype(np.float64)
            assert np.abs(a - e).max() / np.abs(e).max() < TOL, (b, s)
    assert list(both.next_pos) == [70 + steps, 133 + steps]
