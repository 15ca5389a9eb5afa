"""Independent float64 formulations and tie-aware comparisons, for tests and the main job.

Deliberately written differently from the reference backend (scipy.special in float64,
``np.lexsort`` for selection), so that the reference is checked against something it does not
share code with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.special as sps


def router_scores64(x, score_function, use_pre_softmax, expert_bias):
    """float64 (selection scores, unbiased scores) for every expert, shape [T, E] each."""
    x = np.asarray(x, dtype=np.float64)
    if score_function == "softmax":
        s = sps.softmax(x, axis=-1)
        return (s if use_pre_softmax else x), s
    if score_function == "sigmoid":
        s = sps.expit(x)
    else:
        s = np.sqrt(np.where(x > 20, x, np.logaddexp(0.0, x)))
    sel = s + (0.0 if expert_bias is None else np.asarray(expert_bias, np.float64))
    return sel, s


def group_limit64(sel, k, num_groups, group_topk):
    """float64 group-limited selection scores: experts outside the top groups become -inf."""
    T, E = sel.shape
    gs, m = E // num_groups, k // group_topk
    g = np.where(np.isnan(sel), -np.inf, sel).reshape(T, num_groups, gs)
    gscore = -np.sort(-g, axis=2)[:, :, :m].sum(axis=2)
    out = sel.copy()
    for t in range(T):
        keep = np.lexsort((np.arange(num_groups), -gscore[t]))[:group_topk]
        drop = np.setdiff1d(np.arange(num_groups), keep)
        for d in drop:
            out[t, d * gs:(d + 1) * gs] = -np.inf
    return out


def router_topk64(x, k, score_function="softmax", use_pre_softmax=False, expert_bias=None, scaling_factor=1.0,
                  num_groups=0, group_topk=0):
    """float64 router: (weights [T,k], indices [T,k], selection scores [T,E] after group limiting)."""
    x = np.asarray(x, dtype=np.float64)
    sel, s = router_scores64(x, score_function, use_pre_softmax, expert_bias)
    if num_groups:
        sel = group_limit64(sel, k, num_groups, group_topk)
    T, E = x.shape
    idx = np.empty((T, k), np.int64)
    cols = np.arange(E)
    for t in range(T):
        key = np.where(np.isnan(sel[t]), -np.inf, sel[t])
        nan_last = np.isnan(sel[t]).astype(np.int8)
        # primary: non-NaN first; then larger score; then smaller index
        order = np.lexsort((cols, -key, nan_last))
        idx[t] = order[:k]
    if score_function == "softmax" and not use_pre_softmax:
        w = sps.softmax(np.take_along_axis(x, idx, 1), axis=-1)
    else:
        w = np.take_along_axis(s, idx, 1)
        if score_function != "softmax" and k > 1:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * scaling_factor, idx, sel


@dataclass
class RouterComparison:
    rows: int
    tie_rows: int  # rows whose sets differ only among scores tied within rounding
    bad_set_rows: list
    bad_order_rows: list
    max_weight_err: float
    weight_ok: bool

    @property
    def ok(self) -> bool:
        return not self.bad_set_rows and not self.bad_order_rows and self.weight_ok

    def __str__(self) -> str:
        return (f"rows={self.rows} tie_rows={self.tie_rows} bad_sets={self.bad_set_rows[:5]} "
                f"bad_order={self.bad_order_rows[:5]} max_weight_err={self.max_weight_err:.3g} "
                f"weights_ok={self.weight_ok}")


def group_tie_rows(i, i_ref, sel64, k, G, gt, tol=1e-5):
    """Rows whose kept groups differ from the reference's only in groups scored (float64) within
    ``tol`` (relative) of the group_topk-th group score: two group sums that float32 rounds to the
    same value (or orders the other way) legitimately keep either group."""
    T, E = sel64.shape
    gs, m = E // G, k // gt
    gscore = -np.sort(-sel64.reshape(T, G, gs), axis=2)[:, :, :m].sum(2)
    kth = -np.sort(-gscore, axis=1)[:, gt - 1]
    out = set()
    for t in range(T):
        diff = sorted(set((i[t] // gs).tolist()) ^ set((i_ref[t] // gs).tolist()))
        if diff and np.all(np.abs(gscore[t, diff] - kth[t]) <= tol * max(abs(kth[t]), 1e-30)):
            out.add(t)
    return out


def router_tolerances(E: int, dtype: str = "float32") -> tuple[float, float]:
    """(atol, rtol) of spec/router.md for float32 logits."""
    return max(1e-5, 4e-7 * E), max(1.3e-6, 4e-7 * E)


def compare_router(weights, indices, ref_weights, ref_indices, sel_scores, atol, rtol, tie_tol=2e-6):
    """Compare one router result with another (or with the float64 one), tie-aware.

    Sets must match, except where the experts that differ have selection scores within
    ``tie_tol`` (relative) of the row's k-th score.  Order must be non-increasing in selection
    score (within the same tolerance).  Weights are compared per expert on rows whose sets match.
    """
    w = np.asarray(weights, np.float64)
    i = np.asarray(indices).astype(np.int64)
    rw = np.asarray(ref_weights, np.float64)
    ri = np.asarray(ref_indices).astype(np.int64)
    sel = np.asarray(sel_scores, np.float64)
    T, k = i.shape
    bad_set, bad_order, ties = [], [], 0
    wmask = np.ones(T, bool)
    for t in range(T):
        a, b = set(i[t].tolist()), set(ri[t].tolist())
        st = sel[t]
        if len(a) != k:
            bad_set.append(t)
            wmask[t] = False
            continue
        if a != b:
            kth = np.nanmin(st[ri[t]]) if np.isfinite(st[ri[t]]).any() else np.nan
            diff = np.array(sorted(a ^ b))
            scale = max(abs(kth), 1e-30) if np.isfinite(kth) else 1.0
            close = np.abs(st[diff] - kth) <= tie_tol * scale + 1e-12
            nan_both = np.isnan(st[diff]).all() and np.isnan(kth)
            if close.all() or nan_both:
                ties += 1
            else:
                bad_set.append(t)
            wmask[t] = False
        vals = st[i[t]]
        fin = np.where(np.isnan(vals), -np.inf, vals)
        with np.errstate(invalid="ignore"):  # equal infinities: inf - inf is NaN, which compares as in order
            rises = np.diff(fin) > tie_tol * np.maximum(np.abs(fin[1:]), 1e-30) + 1e-12
        if np.any(rises):
            bad_order.append(t)
    # weights per expert: sort both rows by index
    if wmask.any():
        oi = np.argsort(i[wmask], 1)
        ori = np.argsort(ri[wmask], 1)
        a = np.take_along_axis(w[wmask], oi, 1)
        b = np.take_along_axis(rw[wmask], ori, 1)
        both_nan = np.isnan(a) & np.isnan(b)
        err = np.where(both_nan, 0.0, np.abs(a - b))
        max_err = float(np.nanmax(err)) if err.size else 0.0
        ok = bool(np.all(both_nan | (np.abs(a - b) <= atol + rtol * np.abs(b))))
    else:
        max_err, ok = 0.0, True
    return RouterComparison(T, ties, bad_set, bad_order, max_err, ok)
