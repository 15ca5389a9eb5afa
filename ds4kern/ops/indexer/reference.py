"""indexer_topk's reference backend (numpy, float64 logits), its input checks, and the near-tie
aware checker the GPU tests compare with.

Logits of token t (sequence b = t when B == T, else 0), column c < lengths[t]::

    logits[t, c] = sum_h w[t, h] * relu(q[t, h] . key_b[c])            bf16 keys
    logits[t, c] = sum_h w[t, h] * relu(scale_b[c] * (q[t, h] . k8_b[c]))   fp8 keys (e4m3 codes)

accumulated in float64 from the exact bf16 / e4m3 values (every product is exact in float64), then
rounded once to float32; columns >= lengths[t] are -inf.  Selection: ``reference_topk_rows`` of
topk_rows (descending, ties to the lower column, NaN lowest, -1 padding) on the float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sparse_attention.reference import E4M3_VALUES
from ..topk.reference import reference_topk_rows

HEADS = 64
DIM = 128
PAGE = 64
_CHUNK = 1 << 22  # float64 elements of one [tokens x 64, columns] block of dot products (32 MB)

__all__ = ["reference_indexer_logits", "reference_indexer_topk", "check_lengths", "check_pages", "check_topk",
           "TopkReport", "sequence_of", "reference_variant"]


# -- input checks (the GPU clamps and counts instead) --------------------------------------------


def sequence_of(tokens: int, sequences: int) -> np.ndarray:
    """Sequence read by each token: t when B == T (one query per sequence), else 0 (B == 1)."""
    return np.arange(tokens) if sequences == tokens else np.zeros(tokens, np.int64)


def check_lengths(lengths, cols: int, paged: bool) -> None:
    n = np.asarray(lengths)
    bad = (n < 0) | (n > cols)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        bound = f"max_pages * 64 = {cols}" if paged else f"C = {cols}"
        raise ValueError(f"lengths must lie in [0, {bound}]; lengths[{t}] = {int(n[t])} ({int(bad.sum())} bad)")


def check_pages(block_table, lengths, pages: int) -> None:
    """Every page a token's columns below its length need must be in [0, pages); entries beyond
    every length of a sequence's tokens are never read and may hold anything (e.g. -1)."""
    bt = np.asarray(block_table)
    n = np.asarray(lengths).astype(np.int64)
    seq = sequence_of(n.size, bt.shape[0])
    need = np.zeros(bt.shape[0], np.int64)
    if n.size:
        np.maximum.at(need, seq, -(-n // PAGE))
    used = np.arange(bt.shape[1])[None, :] < need[:, None]
    bad = used & ((bt < 0) | (bt >= pages))
    if bad.any():
        b, j = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"block_table[{b}, {j}] = {int(bt[b, j])} is not a page of keys (pages = {pages}), and "
                         f"columns {j * PAGE} .. {j * PAGE + PAGE - 1} of sequence {b} are below a token's length "
                         f"({int(bad.sum())} bad entries)")


# -- logits ----------------------------------------------------------------------------------------


def _key_values(keys, key_format, key_scales, block_table, b: int, n: int) -> np.ndarray:
    """float64 ``[n, 128]`` values of the first n key columns of sequence b (fp8: times the scale)."""
    keys = np.asarray(keys)
    if block_table is not None:
        pg = np.asarray(block_table)[b, :-(-n // PAGE)].astype(np.int64)
        rows = (pg[:, None] * PAGE + np.arange(PAGE)[None, :]).reshape(-1)[:n]
        flat = keys.reshape(-1, DIM)[rows]
        scales = None if key_scales is None else np.asarray(key_scales).reshape(-1)[rows]
    else:
        flat = keys[b, :n]
        scales = None if key_scales is None else np.asarray(key_scales)[b, :n]
    if key_format == "fp8":
        with np.errstate(invalid="ignore", over="ignore"):
            return E4M3_VALUES[flat] * scales.astype(np.float64)[:, None]
    return flat.astype(np.float64)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, 0.0, x)  # keeps NaN


def reference_indexer_logits(q_idx, w, keys, lengths, key_format: str = "bf16", key_scales=None,
                             block_table=None, magnitude: bool = False):
    """float64 ``[T, C]`` logits (-inf at columns >= lengths[t]); inputs must be checked already.

    ``magnitude=True`` returns ``(logits, mag)`` too, with ``mag[t]`` the largest over the row's
    valid columns of ``sum_h |w[t, h]| sum_d |q[t, h, d] key[c, d]|``: the scale of the rounding
    error of any float32 evaluation of the row (0 for an empty row)."""
    q = np.asarray(q_idx)
    wt = np.asarray(w).astype(np.float64)
    n = np.asarray(lengths).astype(np.int64)
    T = q.shape[0]
    if block_table is not None:
        B, C = np.asarray(block_table).shape[0], np.asarray(block_table).shape[1] * PAGE
    else:
        B, C = np.asarray(keys).shape[0], np.asarray(keys).shape[1]
    seq = sequence_of(T, B)
    out = np.full((T, C), -np.inf)
    mag = np.zeros(T)
    for b in np.unique(seq):
        toks = np.flatnonzero(seq == b)
        top = int(n[toks].max()) if toks.size else 0
        if top == 0:
            continue
        K = _key_values(keys, key_format, key_scales, block_table, int(b), top)
        Ka = np.abs(K) if magnitude else None
        step_t = max(1, min(toks.size, _CHUNK // (HEADS * top)))
        for i0 in range(0, toks.size, step_t):
            ts = toks[i0:i0 + step_t]
            qf = q[ts].astype(np.float64).reshape(-1, DIM)  # [g * 64, 128]
            wg = wt[ts][:, None, :]                          # [g, 1, 64]
            cc = max(1, _CHUNK // qf.shape[0])
            for c0 in range(0, top, cc):
                c1 = min(top, c0 + cc)
                with np.errstate(invalid="ignore", over="ignore"):
                    S = (qf @ K[c0:c1].T).reshape(ts.size, HEADS, c1 - c0)
                    out[ts, c0:c1] = (wg @ _relu(S))[:, 0, :]
                    if magnitude:
                        A = (np.abs(qf) @ Ka[c0:c1].T).reshape(ts.size, HEADS, c1 - c0)
                        M = (np.abs(wg) @ A)[:, 0, :]
                        lim = np.arange(c0, c1)[None, :] < n[ts][:, None]
                        mag[ts] = np.maximum(mag[ts], np.where(lim, M, 0.0).max(axis=1))
    out[np.arange(C)[None, :] >= n[:, None]] = -np.inf
    return (out, mag) if magnitude else out


def reference_indexer_topk(q_idx, w, keys, k: int, lengths, key_format: str = "bf16", key_scales=None,
                           block_table=None):
    """``(indices int32 [T, k], logits float32 [T, C])``: the reference's answer."""
    logits = reference_indexer_logits(q_idx, w, keys, lengths, key_format, key_scales, block_table).astype(np.float32)
    return reference_topk_rows(logits, k, np.asarray(lengths).astype(np.int64)), logits


# -- the near-tie aware comparison ------------------------------------------------------------------


@dataclass
class TopkReport:
    """How a top-k answer compares with the exact reference.  ``entries``: selected places (sum of
    min(k, lengths[t])); ``differ``: places holding another column than the reference's (each
    explained by a near-tie: a score within the slack of the reference's at that place);
    ``rows_differ``: rows with such a place; ``separated_rows``: rows whose top scores are all
    further apart than the slack (these must equal the reference exactly)."""

    rows: int
    entries: int
    differ: int
    rows_differ: int
    separated_rows: int

    def __str__(self) -> str:
        return (f"{self.differ} of {self.entries} selected places differ from the exact reference through "
                f"near-ties ({self.rows_differ} of {self.rows} rows); {self.separated_rows} rows well separated "
                "and exact")


def check_topk(indices, logits64, lengths, k: int, tol) -> TopkReport:
    """Check GPU top-k ``indices`` (int32 ``[T, k]``) against the float64 ``logits64`` and report
    how they differ from the exact reference (``reference_topk_rows`` of the float32-rounded
    logits).  ``tol``: per row (scalar or ``[T]``), a bound on the absolute error of the GPU's
    float32 logits; the slack of every comparison is ``3 tol`` (two GPU errors may meet, plus
    the float32 rounding of the reference's logits, itself below ``tol``).

    Raises AssertionError unless, in every row t with n = lengths[t], m = min(k, n): places m ..
    k - 1 are -1; the first m are distinct columns in [0, n); no unselected column's score exceeds
    the lowest selected one's by more than the slack; consecutive selected scores never rise by more
    than the slack; a place differing from the reference holds a score within the slack of the
    reference's; and a row whose top m + 1 scores are all further apart than the slack equals the
    reference exactly."""
    got = np.asarray(indices)
    L = np.asarray(logits64, np.float64)
    n_all = np.asarray(lengths).astype(np.int64)
    T = L.shape[0]
    tol = np.broadcast_to(np.asarray(tol, np.float64), (T,))
    if got.shape != (T, k):
        raise AssertionError(f"indices have shape {got.shape}, expected {(T, k)}")
    ref = reference_topk_rows(L.astype(np.float32), k, n_all)
    entries = differ = rows_differ = separated = 0
    for t in range(T):
        n = int(n_all[t])
        m = min(k, n)
        slack = 3.0 * tol[t]
        row = got[t].astype(np.int64)
        if (row[m:] != -1).any():
            raise AssertionError(f"row {t}: places {m} .. {k - 1} must be -1 (length {n}, k {k}); got {row[m:][:8]}")
        sel = row[:m]
        if ((sel < 0) | (sel >= n)).any():
            raise AssertionError(f"row {t}: selected columns must lie in [0, {n}); got {sel[(sel < 0) | (sel >= n)][:8]}")
        if np.unique(sel).size != m:
            raise AssertionError(f"row {t}: duplicate columns among the selected")
        entries += m
        if m == 0:
            continue
        s = L[t, :n].copy()
        s[np.isnan(s)] = -np.inf  # NaN ranks lowest
        ss = s[sel]
        if m < n:
            rest = np.ones(n, bool)
            rest[sel] = False
            worst, best_out = ss.min(), s[rest].max()
            if worst < best_out - slack:
                c = int(np.flatnonzero(rest)[np.argmax(s[rest])])
                raise AssertionError(f"row {t}: column {c} (score {best_out!r}) left out while a selected score is "
                                     f"{worst!r} (slack {slack:.3g})")
        rise = ss[1:] > ss[:-1] + slack
        if rise.any():
            i = int(np.flatnonzero(rise)[0])
            raise AssertionError(f"row {t}: place {i + 1} (score {ss[i + 1]!r}) above place {i} ({ss[i]!r}), "
                                 f"slack {slack:.3g}")
        d = sel != ref[t, :m]
        if d.any():
            a, b = s[sel[d]], s[ref[t, :m][d]]
            with np.errstate(invalid="ignore"):
                gap = np.where(a == b, 0.0, np.abs(a - b))
            if (gap > slack).any():
                i = int(np.flatnonzero(d)[np.argmax(gap)])
                raise AssertionError(f"row {t}, place {i}: column {sel[i]} (score {s[sel[i]]!r}) where the reference "
                                     f"has {ref[t, i]} ({s[ref[t, i]]!r}); slack {slack:.3g}")
            differ += int(d.sum())
            rows_differ += 1
        top = np.sort(s)[::-1][:m + 1]
        with np.errstate(invalid="ignore"):
            gaps = top[:-1] - top[1:]
        if top.size > 1 and (gaps > slack).all() or top.size == 1:
            separated += 1
            if d.any():
                raise AssertionError(f"row {t}: scores well separated (slack {slack:.3g}) but the selection differs "
                                     "from the reference")
    return TopkReport(T, entries, differ, rows_differ, separated)


def reference_variant(a) -> None:
    """The ``reference`` variant: fills ``a.out`` (and ``a.logits``, when asked for)."""
    logits = reference_indexer_logits(a.q, a.w, a.keys, a.lengths, a.problem.key_format, a.key_scales,
                                      a.block_table).astype(np.float32)
    if a.logits is not None:
        a.logits[...] = logits
    a.out[...] = reference_topk_rows(logits, a.k, a.lengths)
