"""Inputs and float64 oracles shared by the expert_mlp tests (host or device arrays alike).

The oracles start from the same bf16 inputs as the op and compute in float64, rounding only
where the op defines a storage format: h to bf16 (round to nearest even), and nothing else (the
caller compares with the op's bf16 or float32 output).  They do not use ``ds4kern``'s reference.
"""

from __future__ import annotations

import numpy as np

from ds4kern.core.arrays import BFLOAT16

POISON_BF16 = 0x7FC1  # a NaN payload no computation produces: an unwritten bf16 element keeps it


def offsets_of(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def make_case(rng, E, D, I, counts, tail=0, gain=1.0):
    """Host arrays: x bf16 ``[sum(counts) + tail, D]``, offsets int32, weights bf16 scaled so that
    g and u are about ``gain`` in size (gain 8: the clamp at 10 bites often)."""
    counts = np.asarray(counts, np.int64)
    assert counts.shape == (E,)
    N = int(counts.sum()) + tail
    x = rng.standard_normal((N, D)).astype(BFLOAT16)
    s_in = gain / np.sqrt(D)
    wg = (s_in * rng.standard_normal((E, I, D))).astype(BFLOAT16)
    wu = (s_in * rng.standard_normal((E, I, D))).astype(BFLOAT16)
    wd = (rng.standard_normal((E, D, I)) / np.sqrt(I)).astype(BFLOAT16)
    return dict(x=x, offsets=offsets_of(counts), w_gate=wg, w_up=wu, w_down=wd)


def random_counts(rng, E, N_routed, empty_fraction=0.3):
    """Row counts of E experts summing to N_routed, about ``empty_fraction`` of experts empty."""
    live = rng.random(E) >= empty_fraction
    if not live.any():
        live[rng.integers(E)] = True
    idx = np.flatnonzero(live)
    counts = np.zeros(E, np.int64)
    np.add.at(counts, rng.choice(idx, N_routed), 1)
    return counts


def routed_counts(rng, E, tokens, k):
    """Row counts of a decode batch: each token picks k distinct experts uniformly."""
    counts = np.zeros(E, np.int64)
    for _ in range(tokens):
        counts[rng.choice(E, k, replace=False)] += 1
    return counts


# -- float64 oracles -----------------------------------------------------------------------


def f64(xp, a):
    """bf16 array (host or device) -> float64, exactly, through its bit patterns."""
    u = xp.ascontiguousarray(a).view(xp.uint16).astype(xp.uint32) << 16
    return u.view(xp.float32).astype(xp.float64)


def round_bf16(xp, v):
    """float64 -> float64 holding the bf16 rounding (to float32 first, then to nearest even bf16)."""
    u = xp.ascontiguousarray(v.astype(xp.float32)).view(xp.uint32)
    r = ((u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16) << 16
    r = xp.where(xp.isnan(v), u, r).astype(xp.uint32)
    return r.view(xp.float32).astype(xp.float64)


def swiglu64(xp, g, u, limit):
    if limit:
        g = xp.minimum(g, limit)
        u = xp.clip(u, -limit, limit)
    with np.errstate(over="ignore"):
        return g / (1.0 + xp.exp(-g)) * u


def oracle(xp, x, offsets, w_gate, w_up, w_down, limit):
    """float64 ``[offsets[E], D]`` per expert (host offsets), arrays on ``xp``; h rounded to bf16."""
    o = np.asarray(offsets).astype(np.int64)
    D = x.shape[1]
    out = xp.zeros((int(o[-1]), D), xp.float64)
    for e in range(len(o) - 1):
        lo, hi = int(o[e]), int(o[e + 1])
        if hi <= lo:
            continue
        xe = f64(xp, x[lo:hi])
        h = round_bf16(xp, swiglu64(xp, xe @ f64(xp, w_gate[e]).T, xe @ f64(xp, w_up[e]).T, limit))
        out[lo:hi] = h @ f64(xp, w_down[e]).T
    return out


def oracle_rows(x, offsets, w_gate, w_up, w_down, limit):
    """The same, host only, formulated row by row: each row gathers its expert's weights
    (``searchsorted`` on offsets) and contracts with einsum.  For small cases."""
    o = np.asarray(offsets).astype(np.int64)
    m = int(o[-1])
    eid = np.searchsorted(o, np.arange(m), side="right") - 1
    xr = f64(np, x[:m])
    g = np.einsum("nd,nid->ni", xr, f64(np, w_gate)[eid])
    u = np.einsum("nd,nid->ni", xr, f64(np, w_up)[eid])
    h = round_bf16(np, swiglu64(np, g, u, limit))
    return np.einsum("ni,ndi->nd", h, f64(np, w_down)[eid])


def rel_err(got, want) -> float:
    got = np.asarray(got).astype(np.float64)
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (den if den > 0 else 1.0))
