"""The torch eager composite of a DeepSeek-V4 layer (``bench/models/torch_composite.py``, the
baseline the decode step is timed against) on its numpy adaptor, against ds4kern's
``attention_decode`` + ``moe_block`` on a second, identical model: the same X into both, layer by
layer (and block by block), at the small config (hash-routed SWA, CSA, HCA, CSA).  Tokens whose
routing or indexer choice differs between the two float paths (near-ties) are left out of the
value comparison; most must agree.  Needs neither torch nor a GPU."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ds4kern.models.deepseek_v4 import config as C
from ds4kern.models.deepseek_v4.attention import attention_decode
from ds4kern.models.deepseek_v4.model import Model, decode_step
from ds4kern.models.deepseek_v4.moe import moe_block

TOL = 2e-2        # relative to the largest |X| of the call: bf16 storage of rows, intermediates, outputs
MEAN_TOL = 1e-3   # the mean error of a block: single bf16 flips, not a systematic difference
_PATH = Path(__file__).resolve().parents[2] / "bench" / "models" / "torch_composite.py"


@pytest.fixture(scope="module")
def tc():
    spec = importlib.util.spec_from_file_location("ds4kern_bench_torch_composite", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _models(cfg, batch, start=None, resident=None):
    """Two identical models (the composite copies the first, ds4kern runs the second), their
    states filled as if ``start`` positions were decoded."""
    ms = [Model.random(cfg, batch, resident=resident) for _ in range(2)]
    if start is not None:
        for m in ms:
            for l in m.layers:
                l.state.fill_random(start, seed=3)
    return ms


def _close_state(a, b, name):
    """Composite state ``a`` against ds4kern's ``b``: equal -inf where b has them, within TOL of
    b's largest |value| elsewhere, and most elements identical."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, name
    same = a == b
    fin = np.isfinite(b)
    assert (same | fin).all(), f"{name}: non-finite entries differ"
    with np.errstate(invalid="ignore"):  # -inf - -inf where both hold the initial score
        rel = np.abs(np.where(same, 0.0, a - b)).max() / max(np.abs(b[fin]).max(), 1e-30)
    assert rel < TOL, f"{name}: {rel:.3e}"
    assert same.mean() > 0.95, f"{name}: only {same.mean():.1%} of the elements identical"


def _check_states(comp_model, model):
    for i, (c, l) in enumerate(zip(comp_model.layers, model.layers)):
        st = l.state
        _close_state(c.pool, st.pool, f"layer {i} pool")
        assert (c.next_pos == st.next_pos).all()
        if st.comp is not None:
            _close_state(c.comp[0], st.comp[0], f"layer {i} compressor kv state")
            _close_state(c.comp[1], st.comp[1], f"layer {i} compressor score state")
        if st.index_keys is not None:
            _close_state(c.index_keys, st.index_keys, f"layer {i} indexer keys")
            _close_state(c.index_comp[0], st.index_comp[0], f"layer {i} indexer kv state")
            _close_state(c.index_comp[1], st.index_comp[1], f"layer {i} indexer score state")


def test_layers_match_from_position_0(tc):
    """10 decode steps from position 0 (CSA rows emitted at positions 3 and 7), every layer's
    ``decode`` against attention_decode + moe_block on the same X."""
    cfg, B = C.small(512), 2
    m, ref = _models(cfg, B)
    comp = tc.TorchCompositeModel(m, tc.NumpyOps())
    rng = np.random.default_rng(1)
    agree, worst = [], 0.0
    for p in range(10):
        tok = rng.integers(0, cfg.vocab, B).astype(np.int32)
        pos = np.full(B, p)
        X = ref.embed_tokens(tok)
        for i, (l, c) in enumerate(zip(ref.layers, comp.layers)):
            got = c.decode(X, tok, pos)
            t = {}
            X = moe_block(cfg, l.moe, attention_decode(cfg, l.attn, l.state, X, pos), tok, layer=i, trace=t)
            assert got.shape == X.shape and got.dtype == np.float32
            same = tc.same_choices(t["indices"], l.state.last_selected, c)
            agree.append(same)
            if same.any():
                worst = max(worst, float(tc.row_errors(got, X)[same].max()))
    share = np.concatenate(agree).mean()
    assert share >= 0.9, f"only {share:.0%} of (step, layer, token) choices agree"
    assert worst < TOL, worst
    _check_states(comp, ref)


def test_blocks_match_from_filled_state(tc):
    """From states filled at positions 250 / 137 (the indexer picks 16 of 62+ columns, sequence
    0 emits an HCA row at position 255, the window ring wraps), 8 steps, expert weights folded
    (resident 24 of 64): the attention block and the MoE block each on the same input."""
    cfg, B = C.small(512), 2
    start = np.array([250, 137])
    m, ref = _models(cfg, B, start, resident=24)
    comp = tc.TorchCompositeModel(m, tc.NumpyOps())
    hca_rows = np.asarray(comp.layers[2].pool[:8], np.float32).copy()  # both sequences' 4 HCA rows
    rng = np.random.default_rng(2)
    errs = {(blk, i): [] for blk in ("attention", "moe") for i in range(cfg.layers)}
    agree = []
    for s in range(8):
        tok = rng.integers(0, cfg.vocab, B).astype(np.int32)
        pos = start + s
        X = ref.embed_tokens(tok)
        for i, (l, c) in enumerate(zip(ref.layers, comp.layers)):
            got_a = c.attention(X, pos, c.ops.index(pos))
            c.next_pos = pos + 1
            Xa = attention_decode(cfg, l.attn, l.state, X, pos)
            got_m = c.moe(Xa, c.ops.index(tok))
            t = {}
            X = moe_block(cfg, l.moe, Xa, tok, layer=i, trace=t)
            same = tc.same_choices(t["indices"], l.state.last_selected, c)
            agree.append(same)
            if l.state.last_selected is not None:
                assert (np.asarray(l.state.last_selected) >= 0).sum(axis=1).min() == cfg.index_topk
            errs["attention", i] += list(tc.row_errors(got_a, Xa)[same])
            errs["moe", i] += list(tc.row_errors(got_m, X)[same])
    share = np.concatenate(agree).mean()
    assert share >= 0.9, f"only {share:.0%} of (step, layer, token) choices agree"
    for key, e in errs.items():
        assert e and max(e) < TOL and np.mean(e) < MEAN_TOL, (key, max(e), np.mean(e))
    changed = (np.asarray(comp.layers[2].pool[:8], np.float32) != hca_rows).any(axis=1)
    assert changed.tolist() == [False, True] + [False] * 6  # position 255 emitted sequence 0's row 1
    _check_states(comp, ref)


def test_model_step_matches_decode_step(tc):
    """The composite's whole step (embedding, 4 layers) against ``decode_step``, 6 steps, B = 3."""
    cfg, B = C.small(512), 3
    m, ref = _models(cfg, B, np.array([40, 3, 61]))
    comp = tc.TorchCompositeModel(m, tc.NumpyOps())
    rng = np.random.default_rng(3)
    good = 0
    for s in range(6):
        tok = rng.integers(0, cfg.vocab, B).astype(np.int32)
        pos = ref.layers[0].state.next_pos.copy()
        trace = []
        want = decode_step(ref, tok, pos, trace=trace)
        got = comp.step(tok, pos)
        same = np.ones(B, bool)
        for t, c in zip(trace, comp.layers):
            same &= tc.same_choices(t["indices"], t["selected"], c)
        good += int(same.sum())
        if same.any():
            assert tc.row_errors(got, want)[same].max() < TOL
    assert good >= 0.8 * 6 * B, f"the choices of only {good} of {6 * B} tokens agree in every layer"


def test_numpy_ops_primitives(tc):
    o = tc.NumpyOps()
    v, i = o.topk(np.array([[1.0, 3.0, 3.0, -np.inf, 2.0]], np.float32), 4)
    assert i.tolist() == [[1, 2, 4, 0]] and i.dtype == np.int64          # ties to the lower index
    assert v.tolist() == [[3.0, 3.0, 2.0, 1.0]]
    x = np.array([1.0 + 2.0 ** -9, 1.0 + 3 * 2.0 ** -9], np.float32)
    assert o.bf16(x).astype(np.float32).tolist() == [1.0, 1.0 + 2.0 ** -7]   # round to nearest even
    w = o.bf16(np.arange(6, dtype=np.float32).reshape(3, 2))
    xb = o.bf16(np.ones((1, 2), np.float32))
    assert o.linear(xb, w).tolist() == [[1.0, 5.0, 9.0]] and o.linear(xb, w, True).dtype == w.dtype


def test_refuses_out_of_order_positions(tc):
    cfg = C.small(512)
    m = Model.random(cfg, 2, layers=1)
    c = tc.TorchCompositeLayer(cfg, m.layers[0].attn, m.layers[0].moe, m.layers[0].state, tc.NumpyOps())
    X = m.embed_tokens(np.array([1, 2]))
    with pytest.raises(ValueError, match="next positions"):
        c.decode(X, np.array([1, 2]), np.array([1, 0]))
    c.decode(X, np.array([1, 2]), np.array([0, 0]))
    assert c.next_pos.tolist() == [1, 1] and m.layers[0].state.next_pos.tolist() == [0, 0]  # own state


def test_attention_block_alone(tc):
    """moe=None (attention_bench's torch column): the block's output equals the full layer's
    attention half on the same state."""
    cfg = C.small(512)
    m = Model.random(cfg, 2, layers=3, seed=3)
    l = m.layers[2]  # CSA
    X = m.embed_tokens(np.array([5, 9]))
    pos_h = np.array([0, 0], np.int64)
    alone = tc.TorchCompositeLayer(cfg, l.attn, None, l.state, tc.NumpyOps())
    full = tc.TorchCompositeLayer(cfg, l.attn, l.moe, l.state, tc.NumpyOps())
    assert alone.m is None and alone.resident == 0
    a = alone.attention(np.asarray(X, np.float32), pos_h, pos_h)
    b = full.attention(np.asarray(X, np.float32), pos_h, pos_h)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and not np.array_equal(a, X)
    with pytest.raises(ValueError, match="moe=None"):
        alone.moe(a, None)
