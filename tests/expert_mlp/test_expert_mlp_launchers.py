"""The CUDA variants' launchers, run on the host: their kernels are replaced by numpy stand-ins
(the grouped kernels by the lane-level emulation of ``em_emulation``), so argument order, grid
and block sizes, shared memory, scratch and the per-expert slicing of ``naive`` are checked
without a GPU.  The GPU tests run the same launchers with the real kernels."""

import dataclasses
import re
import types

import numpy as np
import pytest
from em_cases import POISON_BF16, make_case, oracle, rel_err
from em_emulation import down_block, gate_up_block

from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.expert_mlp import expert_mlp
from ds4kern.ops.expert_mlp import kernels as K
from ds4kern.ops.expert_mlp import variants as V
from ds4kern.ops.expert_mlp.reference import swiglu

XP = types.SimpleNamespace(asnumpy=np.asarray, empty=np.empty, ascontiguousarray=np.ascontiguousarray)


class FakeKernel:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, grid, block, args, shared_mem=0):
        self.log.append((self.name, grid, block, shared_mem))
        tn = int(re.search(r"<(\d+)", self.name).group(1)) if "<" in self.name and "store" not in self.name else 0
        if self.name.startswith("expert_mlp_gate_up"):
            assert block == (K.THREADS,) and shared_mem == K.grouped_smem(tn)
            x, offsets, wg, wu, E, N, D, I, limit, h = args
            for w in range(grid[0]):
                gate_up_block(x.view(np.uint16), offsets, wg.view(np.uint16), wu.view(np.uint16), int(E), int(N),
                              int(D), int(I), float(limit), h, tn, w)
        elif self.name.startswith("expert_mlp_down"):
            assert block == (K.THREADS,) and shared_mem == K.grouped_smem(tn)
            h, offsets, wd, E, N, D, I, out = args
            assert h.dtype == np.uint16 and h.shape == (int(N), int(I))
            for w in range(grid[0]):
                down_block(h, offsets, wd.view(np.uint16), int(E), int(N), int(D), int(I), out, tn, w)
        elif self.name == K.WIDEN_NAME:
            src, rs, cs, rows, cols, dst = args
            assert (int(rs) * 2, int(cs) * 2) == src.strides and (int(rows), int(cols)) == src.shape
            dst[...] = src.astype(np.float32)
        elif self.name == K.SWIGLU_NAME:
            g, u, n, limit = args
            assert g.flags.c_contiguous and g.size == int(n)
            g[...] = swiglu(g, u, float(limit)).astype(BFLOAT16).astype(np.float32)
        else:
            src, n, dst = args
            assert dst.size == int(n) and dst.flags.c_contiguous
            dst[...] = src.astype(dst.dtype)


@pytest.fixture
def fake_kernels(monkeypatch):
    log = []
    for fam in (K.GROUPED, K.NAIVE):
        fake = dataclasses.replace(fam)
        object.__setattr__(fake, "kernel",
                           lambda name, _f=fam: (_f.name_expressions.index(name), FakeKernel(name, log))[1])
        monkeypatch.setattr(K, "GROUPED" if fam is K.GROUPED else "NAIVE", fake)
    monkeypatch.setattr(V, "_allow_smem", lambda kern, n: None)
    return log


def host_args(c, limit, out):
    call = expert_mlp.op.prepare(c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], limit=limit, out=out)
    return dataclasses.replace(call.args, frame=types.SimpleNamespace(xp=XP))


@pytest.mark.parametrize("variant,config", [("naive", {}), ("grouped", {"tokens_per_group": 8}),
                                            ("grouped", {"tokens_per_group": 32})])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_launchers_with_stand_in_kernels(rng, fake_kernels, variant, config, out_dtype):
    c = make_case(rng, 5, 128, 128, [0, 1, 9, 40, 3], tail=4, gain=6.0)
    N = c["x"].shape[0]
    if out_dtype == "float32":
        out = np.full((N, 128), np.nan, np.float32)
    else:
        out = np.full((N, 128), POISON_BF16, np.uint16).view(BFLOAT16)
    a = host_args(c, 10.0, out)
    fn = {"naive": V._naive, "grouped": V._grouped}[variant]
    fn(a, **config)
    m = int(c["offsets"][-1])
    want = oracle(np, c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], 10.0)
    assert rel_err(out[:m], want) < 5e-3
    tail = np.isnan(out[m:]) if out_dtype == "float32" else out[m:].view(np.uint16) == POISON_BF16
    assert tail.all()
    names = [name for name, *_ in fake_kernels]
    if variant == "grouped":
        tn = config["tokens_per_group"]
        assert names == [K.gate_up_name(tn), K.down_name(tn, out_dtype == "float32")]
        grids = [g[0] for _, g, _, _ in fake_kernels]
        assert grids == [K.item_bound(N, 5, tn, 128 // K.GU_FEATURES), K.item_bound(N, 5, tn, 128 // K.TILE_ROWS)]
    else:
        assert names.count(K.SWIGLU_NAME) == 4  # one per touched expert


def test_naive_strided_weights(rng, fake_kernels):
    c = make_case(rng, 3, 64, 64, [4, 0, 5])
    wide = np.zeros((3, 64, 192), BFLOAT16)
    wide[:, :, 64:128] = c["w_gate"]
    c2 = dict(c, w_gate=wide[:, :, 64:128])
    out = np.zeros((9, 64), np.float32)
    a = host_args(c2, None, out)
    assert not a.problem.weights_contiguous
    V._naive(a)
    assert rel_err(out, oracle(np, c["x"], c["offsets"], c["w_gate"], c["w_up"], c["w_down"], None)) < 1e-3


def test_grouped_rejects_unknown_group(rng, fake_kernels):
    c = make_case(rng, 2, 64, 64, [1, 1])
    with pytest.raises(ValueError, match="tokens_per_group"):
        V._grouped(host_args(c, 10.0, None), tokens_per_group=12)
