"""expert_mlp's CUDA variants against a float64 oracle built from the same bf16 inputs, on fresh
random inputs.

Every CUDA variant the registry says supports a problem runs with each of its settings
(``grouped``: ``tokens_per_group``); outputs are poisoned first (a NaN payload), so an unwritten
row fails, and rows beyond offsets[E] must keep the poison.

Tolerance: the oracle rounds h to bf16 as the op does; the GPU sums float32 products (tensor
cores, cuBLAS), so a few h elements round the other way and out is bf16 (2^-9 relative):
``||out - oracle|| / ||oracle|| < 2e-2`` is the bar (measured errors are expected near 3e-3).
"""

import numpy as np
import pytest
from conftest import supported_variants
from em_cases import POISON_BF16, make_case, oracle, offsets_of, rel_err, routed_counts

import ds4kern
import ds4kern.ops.expert_mlp  # noqa: F401  (registers the op before ds4kern imports it)
from ds4kern.core.arrays import BFLOAT16
from ds4kern.core.registry import registry
from ds4kern.ops.expert_mlp import expert_mlp

pytestmark = pytest.mark.gpu

OP = "expert_mlp"
RTOL = 2e-2


def device(cp, c):
    return {k: cp.asarray(v) for k, v in c.items()}


def settings(d, **kw):
    """(variant, config) pairs of every CUDA variant that supports the call, each setting."""
    a = (d["x"], d["offsets"], d["w_gate"], d["w_up"], d["w_down"])
    names = supported_variants(OP, *a, **kw)
    problem = ds4kern.explain(OP, *a, **kw).problem
    out = []
    for name in names:
        cfgs = registry.get(OP, name).configs_for(problem)
        out += [(name, c) for c in cfgs] if cfgs else [(name, None)]
    return out


def poisoned(cp, N, D, out_dtype):
    if out_dtype == "float32":
        return cp.full((N, D), np.nan, cp.float32)
    return cp.full((N, D), POISON_BF16, cp.uint16).view(BFLOAT16)


def run(cp, variant, config, d, limit=10.0, out_dtype="bfloat16"):
    """One GPU call of ``variant`` (with ``config``) into a poisoned output; host result."""
    N, D = (int(s) for s in d["x"].shape)
    out = poisoned(cp, N, D, out_dtype)
    call = expert_mlp.op.prepare(d["x"], d["offsets"], d["w_gate"], d["w_up"], d["w_down"], limit=limit, out=out)
    fn = registry.get(OP, variant).fn
    with call.frame.running():
        fn(call.args, **(config or {}))
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(out)


def check(got, want, m, label):
    bits = got.view(np.uint16) if got.dtype != np.float32 else None
    poison = np.isnan(got) if bits is None else bits == POISON_BF16
    assert not poison[:m].any(), f"{label}: rows of experts left unwritten (first {np.argwhere(poison[:m])[0]})"
    assert poison[m:].all(), f"{label}: a row beyond offsets[E] was written"
    vals = got[:m].astype(np.float64)
    assert not np.isnan(vals).any(), f"{label}: NaN"
    err = rel_err(vals, want)
    assert err < RTOL, f"{label}: relative error {err:.3g}"
    return err


def check_all(cp, c, limit=10.0, out_dtype="bfloat16", label="", need=("naive", "grouped"), want=None):
    d = device(cp, c)
    pairs = settings(d, limit=limit, out_dtype=out_dtype)
    names = {n for n, _ in pairs}
    assert set(need) <= names, (names, label)
    if want is None:
        want = cp.asnumpy(oracle(cp, d["x"], c["offsets"], d["w_gate"], d["w_up"], d["w_down"], limit))
    m = int(c["offsets"][-1])
    errs = {}
    for variant, config in pairs:
        got = run(cp, variant, config, d, limit, out_dtype)
        errs[(variant, str(config))] = check(got, want, m, f"{label} {variant} {config}")
    print(label, errs)
    return pairs


# (E, D, I, rows per expert, rows beyond offsets[E])
CASES = [
    (6, 128, 128, [0, 1, 7, 9, 33, 100], 3),
    (3, 64, 64, [1, 0, 2], 0),
    (1, 512, 256, [300], 0),                 # one expert, every row (the shared expert)
    (9, 256, 512, [0, 0, 5, 0, 64, 65, 1, 0, 17], 11),
    (4, 7168, 3072, [1, 3, 0, 6], 0),        # Pro's sizes, a decode-like spread
]


@pytest.mark.parametrize("E,D,I,counts,tail", CASES, ids=[f"E{c[0]}-D{c[1]}-I{c[2]}" for c in CASES])
@pytest.mark.parametrize("limit,out_dtype", [(10.0, "bfloat16"), (None, "float32")])
def test_variants_match_float64(cp, rng, E, D, I, counts, tail, limit, out_dtype):
    c = make_case(rng, E, D, I, counts, tail=tail, gain=6.0)
    check_all(cp, c, limit, out_dtype, label=f"E={E} D={D} I={I} {counts}")


def test_clamp_on_device(cp, rng):
    """Large activations: the clamp bites on most features; each limit is followed."""
    c = make_case(rng, 5, 128, 256, [3, 40, 0, 9, 1], gain=24.0)
    for limit in (10.0, 1.0, None):
        check_all(cp, c, limit, "float32", label=f"limit={limit}")


def test_only_naive_when_grouped_cannot(cp, rng):
    c = make_case(rng, 3, 96, 80, [4, 0, 7])  # D, I not multiples of 64
    d = device(cp, c)
    dec = ds4kern.explain(OP, d["x"], d["offsets"], d["w_gate"], d["w_up"], d["w_down"])
    rej = {cand.variant.name: cand.rejected for cand in dec.candidates}
    assert "multiples of 64" in rej["grouped"] and dec.chosen.name == "naive"
    check_all(cp, c, need=("naive",))


def test_strided_weights_only_naive(cp, rng):
    c = make_case(rng, 4, 128, 128, [2, 5, 0, 9])
    d = device(cp, c)
    wide = np.zeros((4, 128, 256), BFLOAT16)  # w_gate as a column slice of a wider buffer
    wide[:, :, 64:192] = c["w_gate"]
    view = cp.asarray(wide)[:, :, 64:192]
    dec = ds4kern.explain(OP, d["x"], d["offsets"], view, d["w_up"], d["w_down"])
    assert dec.chosen.name == "naive"
    got = expert_mlp(d["x"], d["offsets"], view, d["w_up"], d["w_down"], out_dtype="float32")
    want = cp.asnumpy(oracle(cp, d["x"], c["offsets"], d["w_gate"], d["w_up"], d["w_down"], 10.0))
    assert rel_err(cp.asnumpy(got), want) < RTOL


def device_bf16(cp, rs, shape, scale):
    """A random bf16 device array (float32 normals times scale, truncated to bf16), made one
    leading slice at a time (the Flash weights are 12.9 GB)."""
    out = cp.empty(shape, cp.uint16)
    for i in range(shape[0]):
        f = rs.standard_normal(shape[1:], dtype=cp.float32) * cp.float32(scale)
        out[i] = (f.view(cp.uint32) >> 16).astype(cp.uint16)
    return out.view(BFLOAT16)


@pytest.fixture(scope="module")
def flash_weights():
    """DeepSeek-V4-Flash expert weights (E = 256, D = 4096, I = 2048), random, on the device."""
    import cupy as cp

    rs = cp.random.RandomState(int.from_bytes(np.random.default_rng().bytes(4), "little"))
    E, D, I = 256, 4096, 2048
    w = dict(w_gate=device_bf16(cp, rs, (E, I, D), 1 / np.sqrt(D)), w_up=device_bf16(cp, rs, (E, I, D), 1 / np.sqrt(D)),
             w_down=device_bf16(cp, rs, (E, D, I), 1 / np.sqrt(I)))
    yield w
    del w
    cp.get_default_memory_pool().free_all_blocks()


@pytest.mark.parametrize("B", [1, 64, 256])
def test_flash_decode(cp, rng, flash_weights, B):
    """B decode tokens x top-6 over 256 experts, random routing: most experts get 0..16 rows."""
    counts = routed_counts(rng, 256, B, 6)
    offsets = offsets_of(counts)
    N = int(offsets[-1])
    x = device_bf16(cp, cp.random.RandomState(int(rng.integers(2 ** 31))), (N, 4096), 1.0)
    d = dict(x=x, offsets=cp.asarray(offsets), **flash_weights)
    want = cp.asnumpy(oracle(cp, x, offsets, d["w_gate"], d["w_up"], d["w_down"], 10.0))
    pairs = settings(d)
    assert {"naive", "grouped"} <= {n for n, _ in pairs}
    for variant, config in pairs:
        check(run(cp, variant, config, d), want, N, f"Flash B={B} {variant} {config}")
    dec = ds4kern.explain(OP, x, d["offsets"], d["w_gate"], d["w_up"], d["w_down"])
    assert dec.chosen.name == "grouped"


def test_grouped_two_launches_no_sync(cp, rng):
    """grouped is two kernels and captures into a CUDA graph (no host synchronisation inside)."""
    from graph_nodes import count_kernel_nodes

    c = make_case(rng, 6, 128, 128, [0, 1, 7, 9, 33, 100])
    d = device(cp, c)
    out = cp.empty((150, 128), BFLOAT16)
    fn = lambda: expert_mlp(d["x"], d["offsets"], d["w_gate"], d["w_up"], d["w_down"], out=out,  # noqa: E731
                            variant="grouped")
    assert count_kernel_nodes(cp, fn) == 2


def test_torch_in_torch_out_and_in_place(cp, rng):
    torch = pytest.importorskip("torch")
    c = make_case(rng, 4, 128, 128, [5, 0, 3, 8])
    d = device(cp, c)
    want = cp.asnumpy(oracle(cp, d["x"], c["offsets"], d["w_gate"], d["w_up"], d["w_down"], 10.0))
    t = {k: (torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == BFLOAT16 else torch.from_numpy(v))
         .cuda() for k, v in c.items()}
    got = expert_mlp(t["x"], t["offsets"], t["w_gate"], t["w_up"], t["w_down"])
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.bfloat16
    assert rel_err(got.float().cpu().numpy(), want) < RTOL
    x = d["x"].copy()
    expert_mlp(x, d["offsets"], d["w_gate"], d["w_up"], d["w_down"], out=x)  # in place
    assert rel_err(cp.asnumpy(x).astype(np.float64), want) < RTOL


def test_bad_device_offsets_stay_in_bounds(cp, rng):
    """Offsets are not checked on the GPU (a sync): decreasing or out-of-range entries must not
    make any variant touch memory outside x, h and out (run under compute-sanitizer in the GPU
    session); rows of well-formed experts are still right."""
    c = make_case(rng, 5, 128, 128, [3, 4, 5, 6, 7])
    d = device(cp, c)
    for bad in ([0, 3, 1, 12, 400, 25], [-9, 3, 7, 12, 18, 25], [0, 3, 7, 12, 18, 10 ** 9]):
        d["offsets"] = cp.asarray(np.array(bad, np.int32))
        for variant in ("naive", "grouped"):
            out = poisoned(cp, 25, 128, "float32")
            expert_mlp(d["x"], d["offsets"], d["w_gate"], d["w_up"], d["w_down"], out=out, variant=variant)
            cp.cuda.get_current_stream().synchronize()
    d["offsets"] = cp.asarray(c["offsets"])
    check_all(cp, c)
