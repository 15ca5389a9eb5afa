"""Expert locality statistics, offline (vectorised numpy over whole captures).

Answers: does expert choice have temporal locality worth exploiting (caching, prefetch,
grouping)?  Input: selections ``[records, layers, k]`` (a routing capture or decoded replay
payload; invalid ids ``< 0`` or ``>= E`` are skipped), optional weights of the same shape, record
positions and sequence ids (default: one sequence, positions ``start, start+1, ...``).

Definitions (per layer; also written into every report under ``definitions``):

- ``records``: token records; ``selections``: valid ids among ``records * k``.
- ``hist[e]``: selections of expert e; ``weight[e]``: sum of its weights (None without weights).
- ``top_experts``: by count desc, weight desc, id asc: id, count, pct = 100 count/selections,
  weight, weight_pct, cum_pct (coverage curve).
- ``entropy`` H = -sum p ln p with p = hist/selections; ``entropy_ratio`` = H / ln(E).
- adjacent pairs: records of one sequence at positions p and p+1 (no pair across a gap);
  ``overlap`` = |A & B| / k and ``jaccard`` = |A & B| / |A | B|, averaged over pairs;
  ``position_stability``: fraction of slots j with the same expert in both records.
- LRU cache of n experts per layer, accesses in record order and slot order: ``hits``,
  ``hit_rate`` = hits / selections, ``weighted_hit_rate`` = weight of hits / total weight.

The LRU simulation is exact and vectorised: an access hits a cache of n experts iff fewer than
n distinct experts were touched since the same expert's previous access (its stack distance).
Those distinct counts are popcounts of ORs of per-record expert bitsets (a sparse table for
short reuse gaps, per-block prefix / suffix ORs for long ones; see ``stack_distances``), with
no Python loop per token.  Layers run in forked worker processes (threads where fork is not
available or the caller runs other threads).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Optional, Sequence

import numpy as np

from ..core.args import int_arg, int_list

__all__ = ["SCHEMA_VERSION", "DEFINITIONS", "layer_stats", "layer_counts", "layer_from_counts", "stack_distances",
           "analyze", "assemble_report", "summary_text"]

SCHEMA_VERSION = 1
DEFINITIONS = {
    "selections": "valid expert ids (0 <= id < E) among records * k",
    "pct": "100 * count / selections",
    "entropy": "H = -sum p ln p, p = hist / selections; entropy_ratio = H / ln(E)",
    "adjacent_pair": "two records of one sequence at positions p and p + 1",
    "overlap": "|A & B| / k averaged over adjacent pairs",
    "jaccard": "|A & B| / |A | B| averaged over adjacent pairs",
    "position_stability": "fraction of slots holding the same expert in both records of a pair",
    "lru": "per layer, LRU cache of n experts; accesses in record order then slot order; "
           "hit_rate = hits / selections; weighted_hit_rate = weight of hits / total weight",
}


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount_rows(a: np.ndarray) -> np.ndarray:
    """Set bits per row of a ``[n, W]`` uint64 array (int32)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        c = np.bitwise_count(a)
    else:
        c = _BYTE_BITS[np.ascontiguousarray(a).view(np.uint8)]
    out = c[:, 0].astype(np.int32)
    for w in range(1, c.shape[1]):
        out += c[:, w]
    return out


def _valid_ids(ids: np.ndarray, E: int) -> np.ndarray:
    # a numpy int64 bound: comparing uint8 ids with the Python int 256 raises on numpy 2.0/2.1
    return (ids >= 0) & (ids < np.int64(E))


class Workspace:
    """Scratch arrays reused from one layer to the next (one per thread)."""

    def __init__(self):
        self.arrays = {}
        self.record_rows = None  # the last layer's record expert sets ([R, W] view), see _distance_chunks

    def get(self, name, shape, dtype=np.uint64):
        """Scratch array ``name`` (uninitialised when new; kept contents are reused)."""
        a = self.arrays.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            self.arrays.pop(name, None)
            a = self.arrays[name] = np.empty(shape, dtype)
        return a


_BLOCK_LEVELS = 6           # record ranges shorter than 2**6 come from a sparse table
_BLOCK = 1 << _BLOCK_LEVELS  # longer ones from per-block suffix / prefix ORs and a block table
_CHUNK = 1 << 16  # accesses per query chunk: its temporaries stay small and are reused by the allocator


def _or_levels(t, n, levels):
    """Fills levels 1 .. levels-1 of a stacked sparse table in place: given level 0 in rows
    [0, n), rows [l*n, l*n + n - 2**l] get the OR of 2**l consecutive level-0 rows from there."""
    for l in range(1, levels):
        m = n - (1 << l) + 1
        if m <= 0:
            break
        h = 1 << (l - 1)
        np.bitwise_or(t[(l - 1) * n:(l - 1) * n + m], t[(l - 1) * n + h:(l - 1) * n + h + m], out=t[l * n:l * n + m])


def _sparse_levels(base, levels, extra_rows=1):
    """Stacked sparse table of ``base`` (see ``_or_levels``); ``extra_rows`` empty rows follow
    the last level."""
    n, W = base.shape
    t = np.zeros((levels * n + extra_rows, W), np.uint64)
    t[:n] = base
    _or_levels(t, n, levels)
    return t


def stack_distances(ids: np.ndarray, num_experts: int, *, workspace: Optional[Workspace] = None,
                    chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """LRU stack distance of every valid access of one layer.

    ``ids`` ``[R, k]``.  Returns ``(distance, valid)``: ``valid`` [R, k] marks valid ids;
    ``distance`` [R, k] holds, for each valid access, the number of distinct experts touched
    since the previous access of the same expert (-1 for a first access or an invalid id).
    An access hits an LRU cache of n experts iff 0 <= distance < n.

    The distinct experts between two accesses are the OR of three bitsets: the slots after the
    earlier access in its record, the whole records between (a sparse table for ranges shorter
    than a block of 64 records; per-block suffix / prefix ORs and a small table over whole blocks
    for longer ones), and the slots before the later access in its record.  Four or six row
    gathers and a popcount per access, queries in time order.  ``workspace`` reuses the large
    scratch arrays from one call to the next (fresh pages cost more than the work itself).
    """
    ids = _id_array("ids", ids, 2, "[R, k]")
    E = int_arg("num_experts", num_experts, lo=1)
    valid = _valid_ids(ids, E)
    dist = np.full(ids.shape, -1, np.int64)
    out = dist.ravel()
    for cur, d in _distance_chunks(ids, E, valid, workspace if workspace is not None else Workspace(), chunk):
        out[cur] = d
    return dist, valid


def _distance_chunks(ids: np.ndarray, E: int, valid: np.ndarray, ws: Workspace, chunk: int):
    """Yields ``(positions, distances)`` in time order for every valid access that has a previous
    access (flat positions r * k + s); the rest are first accesses or invalid."""
    R, k = ids.shape
    ws.record_rows = None
    if R == 0 or not valid.any():
        return
    W = (E + 63) // 64
    N = R * k
    all_valid = bool(valid.all())
    # the narrowest key for the radix sort below: E marks an invalid id (needs E + 1 values unless
    # every id is valid; uint8 sorts ~3x faster than uint16 at E = 256)
    key_t = np.uint8 if E < 255 or (E <= 256 and all_valid) else np.uint16 if E < 65535 else np.int64
    e = (ids.astype(key_t) if all_valid else np.where(valid, ids.astype(key_t), key_t(E))).ravel()
    unit = np.zeros((E + 1, W), np.uint64)
    ar = np.arange(E)
    unit[ar, ar >> 6] = np.left_shift(np.uint64(1), (ar & 63).astype(np.uint64))
    # inclusive prefix (pin) and suffix (sin) ORs along the slots of each record, slot-major
    # (row s * R + r: slot s of record r; contiguous per slot), each followed by one empty row
    # (index N)
    pin = ws.get("pin", (N + 1, W))
    sin = ws.get("sin", (N + 1, W))
    pin[N] = 0
    sin[N] = 0
    p3 = pin[:N].reshape(k, R, W)
    s3 = sin[:N].reshape(k, R, W)
    e2 = e.reshape(R, k)
    for s in range(k):  # each slot's one-hot rows once (into sin's rows), then the prefixes
        np.take(unit, e2[:, s], axis=0, out=s3[s])
        if s == 0:
            np.copyto(p3[0], s3[0])
        else:
            np.bitwise_or(p3[s - 1], s3[s], out=p3[s])
    for s in range(k - 2, -1, -1):  # and the suffixes in place
        np.bitwise_or(s3[s + 1], s3[s], out=s3[s])
    ws.record_rows = p3[k - 1]  # each record's expert set (layer_counts' adjacency reads it)

    # previous accesses of the same expert come chunk by chunk in the loop below: a stable
    # (radix) sort of the chunk's keys links each access to the one before it in the chunk, and
    # `last` (each expert's latest access before the chunk, -1 for none and for the invalid
    # marker E) links the first ones; everything stays cache-sized (a sort of all N keys and the
    # scatter back to time order cost ~190 ms per million records)
    last = np.full(E + 1, -1, np.int64)

    # record-range ORs, one stacked table of rows: levels 0.._BLOCK_LEVELS-1 of a sparse table
    # (ranges shorter than a block), then per-block suffix and prefix ORs (longer ranges, with
    # the whole blocks between them from a small table over block ORs), then one empty row
    L = _BLOCK_LEVELS
    nb = (R + _BLOCK - 1) // _BLOCK
    Rp = nb * _BLOCK
    T = ws.get("table", ((L + 2) * Rp + 1, W))
    T[:R] = p3[k - 1]
    T[R:Rp] = 0
    _or_levels(T, Rp, L)
    lvl0 = T[:Rp].reshape(nb, _BLOCK, W)
    np.bitwise_or.accumulate(lvl0[:, ::-1], axis=1, out=T[L * Rp:(L + 1) * Rp].reshape(nb, _BLOCK, W)[:, ::-1])
    pb = T[(L + 1) * Rp:(L + 2) * Rp].reshape(nb, _BLOCK, W)
    np.bitwise_or.accumulate(lvl0, axis=1, out=pb)
    ZERO = (L + 2) * Rp
    T[ZERO] = 0
    blk = pb[:, -1]
    nbl = max(1, int(nb - 1).bit_length())
    BT = _sparse_levels(blk, nbl)
    BZERO = nbl * nb
    # per range length 0.._BLOCK (the last: any long range): the two rows' offsets from lo / hi
    # (sparse-table level l: l * Rp and l * Rp - 2^l + 1; long: the block suffix / prefix rows)
    lvl = np.zeros(_BLOCK + 1, np.int64)
    for l in range(1, L):
        lvl[1 << l:] = l
    off1 = lvl * Rp
    off2 = lvl * Rp - (1 << lvl) + 1
    off1[_BLOCK], off2[_BLOCK] = L * Rp, (L + 1) * Rp

    for c0 in range(0, N, chunk):  # chunks of accesses (small arrays: no fresh pages per call)
        ek = e[c0:c0 + chunk]
        srt = np.argsort(ek, kind="stable")
        es = ek[srt]
        link = last[es]  # in sorted order: the previous access, or -1
        new_key = es[1:] != es[:-1]
        same = ~new_key
        if not all_valid:
            same &= es[1:] != E
        np.copyto(link[1:], srt[:-1] + c0, where=same)
        ends = np.flatnonzero(np.append(new_key, True))  # each key's last access here
        last[es[ends]] = srt[ends] + c0
        last[E] = -1
        prev_chunk = np.empty_like(link)
        prev_chunk[srt] = link
        has = np.flatnonzero(prev_chunk >= 0)
        if has.size == 0:
            continue
        cur = c0 + has
        prv = prev_chunk[has]
        rc, sc = np.divmod(cur, k)
        rp, sp = np.divmod(prv, k)
        ia = np.where(sp < k - 1, (sp + 1) * R + rp, N)  # slot-major rows of sin / pin
        ib = np.where(sc > 0, (sc - 1) * R + rc, N)
        lo = rp + 1
        hi = rc - 1
        ln = hi - lo + 1  # >= -1 (-1: same record)
        short = ln < _BLOCK
        lc = np.clip(ln, 0, _BLOCK)
        i1 = lo + off1[lc]
        i2 = hi + off2[lc]
        empty = ln <= 0
        i1[empty] = ZERO
        i2[empty] = ZERO
        acc = np.take(sin, ia, axis=0)
        acc |= np.take(pin, ib, axis=0)
        acc |= np.take(T, i1, axis=0)
        acc |= np.take(T, i2, axis=0)
        far = np.flatnonzero(~short)
        if far.size:
            bl = lo[far] // _BLOCK + 1
            bh = hi[far] // _BLOCK - 1
            m = bh - bl + 1
            has = m > 0
            mm = np.maximum(m, 1)
            bv = np.frexp(mm.astype(np.float64))[1] - 1
            j1 = np.where(has, bv * nb + bl, BZERO)
            j2 = np.where(has, bv * nb + bh - (1 << bv) + 1, BZERO)
            acc[far] |= np.take(BT, j1, axis=0) | np.take(BT, j2, axis=0)
        d = _popcount_rows(acc)
        # both accesses in one record (a duplicate id): the slots strictly between them
        samer = np.flatnonzero(ln < 0)
        if samer.size:
            between = np.zeros((samer.size, W), np.uint64)
            r_, a_, b_ = rc[samer], sp[samer], sc[samer]
            for s in range(k):
                inside = (a_ < s) & (s < b_)
                between |= np.where(inside[:, None], np.take(unit, e[r_ * k + s], axis=0), np.uint64(0))
            d[samer] = _popcount_rows(between)
        yield cur, d


def _adjacent_pairs(positions: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((positions, seq))
    a, b = order[:-1], order[1:]
    ok = (seq[a] == seq[b]) & (positions[b] == positions[a] + 1)
    return a[ok], b[ok]


def layer_stats(ids: np.ndarray, num_experts: int, *, weights: Optional[np.ndarray] = None,
                positions: Optional[np.ndarray] = None, seq_ids: Optional[np.ndarray] = None,
                hash_router: bool = False, cache_sizes: Sequence[int] = (), top_n=16,
                workspace: Optional[Workspace] = None) -> dict:
    """Statistics of one layer (see the module docstring); ``ids`` and ``weights`` ``[R, k]``."""
    cache_sizes, top_n = _cache_sizes(cache_sizes), _top_n(top_n)  # (checked before the work)
    return layer_from_counts(**layer_counts(ids, num_experts, weights=weights, positions=positions,
                                            seq_ids=seq_ids, workspace=workspace),
                             hash_router=hash_router, cache_sizes=cache_sizes, top_n=top_n)


def layer_counts(ids: np.ndarray, num_experts: int, *, weights: Optional[np.ndarray] = None,
                 positions: Optional[np.ndarray] = None, seq_ids: Optional[np.ndarray] = None,
                 workspace: Optional[Workspace] = None) -> dict:
    """The counters every statistic comes from (what the GPU recorder accumulates online):
    ``hist`` / ``wsum`` per expert, ``dist`` / ``wdist`` per LRU stack distance (bin E: first
    access), adjacent ``pairs``, same-slot matches ``eq``, and ``iu[inter, union]`` counts."""
    ids = _id_array("ids", ids, 2, "[R, k]")
    R, k = ids.shape
    E = int_arg("num_experts", num_experts, lo=1)
    _check_weights(weights, ids.shape)
    positions, seq_ids = _record_ints("positions", positions, R), _record_ints("seq_ids", seq_ids, R)
    valid = _valid_ids(ids, E)
    e = ids[valid].astype(np.int64)
    hist = np.bincount(e, minlength=E)[:E]
    w = None if weights is None else np.asarray(weights, np.float64)
    wsum = None if w is None else np.bincount(e, weights=w[valid], minlength=E)[:E]
    pos = np.arange(R) if positions is None else positions.astype(np.int64)
    sq = np.zeros(R, np.int64) if seq_ids is None else seq_ids.astype(np.int64)
    # LRU stack-distance histogram, bin E: first accesses
    dist = np.zeros(E + 1, np.int64)
    wdist = None if w is None else np.zeros(E + 1, np.float64)
    wflat = None if w is None else w.ravel()
    first_access = None if w is None else valid.ravel().copy()  # valid accesses with no previous one
    n_q = 0
    ws = workspace if workspace is not None else Workspace()
    for cur, d in _distance_chunks(ids, E, valid, ws, _CHUNK):
        dist += np.bincount(d, minlength=E + 1)
        n_q += len(d)
        if w is not None:
            wdist += np.bincount(d, wflat[cur], E + 1)
            first_access[cur] = False
    # adjacent pairs: |A & B| and |A | B| are popcounts of the records' expert sets (distinct
    # valid ids), which the distance pass built
    a, b = _adjacent_pairs(pos, sq)
    iu = np.zeros((k + 1, 2 * k + 1), np.int64)
    eq_sum = 0
    if len(a):
        views = len(a) == R - 1 and a[0] == 0 and a[-1] == R - 2  # every record pairs with the next
        rows = ws.record_rows
        if rows is None:  # no valid id at all
            inter = union = np.zeros(len(a), np.int64)
        else:
            ra, rb = (rows[:-1], rows[1:]) if views else (np.take(rows, a, axis=0), np.take(rows, b, axis=0))
            inter = _popcount_rows(ra & rb)
            union = _popcount_rows(ra | rb)
        iu += np.bincount(inter * (2 * k + 1) + union, minlength=iu.size).reshape(iu.shape)
        A, B, va, vb = (ids[:-1], ids[1:], valid[:-1], valid[1:]) if views else (ids[a], ids[b], valid[a], valid[b])
        eq_sum = int(((A == B) & va & vb).sum())
    dist[E] += int(hist.sum()) - n_q
    if w is not None:
        wdist[E] += float(wflat[first_access].sum())
    return {"num_experts": E, "k": k, "records": R, "hist": hist, "wsum": wsum,
            "dist": dist, "wdist": wdist, "pairs": int(len(a)), "eq": eq_sum, "iu": iu}


def layer_from_counts(*, num_experts: int, k: int, records: int, hist, wsum, dist, wdist, pairs: int, eq: int, iu,
                      hash_router: bool = False, cache_sizes: Sequence[int] = (), top_n=16) -> dict:
    """One layer's report from its counters (offline analysis and the GPU recorder share this,
    so equal counters give equal reports)."""
    cache_sizes, top_n = _cache_sizes(cache_sizes), _top_n(top_n)
    E = int(num_experts)
    hist = np.asarray(hist, np.int64)
    sel = int(hist.sum())
    wsum = None if wsum is None else np.asarray(wsum, np.float64)
    total_w = None if wsum is None else float(wsum.sum())
    key_w = np.zeros(E) if wsum is None else wsum
    order = np.lexsort((np.arange(E), -key_w, -hist))
    order = order[hist[order] > 0]
    if top_n != "all":
        order = order[:top_n]
    cum = np.cumsum(hist[order]) * (100.0 / sel) if sel else np.zeros(len(order))
    top = []
    for j, x in enumerate(order.tolist()):
        top.append({"id": x, "count": int(hist[x]), "pct": 100.0 * hist[x] / sel,
                    "weight": None if wsum is None else float(wsum[x]),
                    "weight_pct": None if wsum is None or not total_w else 100.0 * wsum[x] / total_w,
                    "cum_pct": float(cum[j])})
    p = hist[hist > 0] / sel if sel else np.zeros(0)
    H = float(-(p * np.log(p)).sum()) if sel else 0.0
    iu = np.asarray(iu, np.int64)
    if pairs:
        inter_v = np.arange(iu.shape[0])[:, None]
        union_v = np.arange(iu.shape[1])[None, :]
        jac_each = np.where(union_v > 0, inter_v / np.maximum(union_v, 1), 1.0)
        overlap = float((iu * inter_v).sum()) / (pairs * k)
        jac = float((iu * jac_each).sum()) / pairs
        stab = eq / (pairs * k)
    else:
        overlap = jac = stab = None
    sizes = sorted({1 << i for i in range(int(math.log2(E)) + 1) if (1 << i) <= E} | set(cache_sizes))
    dist = np.asarray(dist, np.int64)
    hits_upto = np.concatenate([[0], np.cumsum(dist[:E])])  # hits_upto[n] = accesses with distance < n
    wd = None if wdist is None else np.concatenate([[0.0], np.cumsum(np.asarray(wdist, np.float64)[:E])])
    cache = []
    for n in sizes:
        h = int(hits_upto[min(n, E)])
        cache.append({"size": n, "hits": h, "hit_rate": h / sel if sel else None,
                      "weighted_hit_rate": None if wd is None or not total_w else float(wd[min(n, E)] / total_w)})
    return {"records": int(records), "selections": sel, "hash_router": bool(hash_router),
            "unique_experts": int((hist > 0).sum()), "entropy": H,
            "entropy_ratio": H / math.log(E) if E > 1 else None,
            "hist": hist.tolist(), "weight": None if wsum is None else wsum.tolist(),
            "top_experts": top, "adjacent_pairs": int(pairs), "overlap": overlap, "jaccard": jac,
            "position_stability": stab, "cache": cache}


def analyze(selections, num_experts: int, *, weights=None, positions=None, seq_ids=None, hash_layers=(),
            cache_sizes: Sequence[int] = (), top_n=16, source: str = "", model: str = "",
            progress=None, workers: Optional[int] = None) -> dict:
    """The JSON report of a ``[records, layers, k]`` selection array (numpy or CuPy) of integer
    expert ids.  ``positions`` / ``seq_ids``: integers ``[records]``; ``hash_layers``: layers in
    ``[0, layers)``; ``cache_sizes``: extra LRU sizes (ints >= 1); ``top_n``: an int >= 0 or
    ``"all"``; ``workers``: an int >= 1 (default: by cores and memory); ``progress(done, total)``
    after each layer.  Every argument is checked before the work starts."""
    if hasattr(selections, "get") and not isinstance(selections, np.ndarray):
        selections = selections.get()
    arr = np.asarray(selections)
    if arr.ndim != 3:
        raise ValueError(f"selections must have shape [records, layers, k], got {arr.shape}")
    num_experts = int_arg("num_experts", num_experts, lo=1)
    R, L, k = arr.shape
    w_all = _check_weights(weights, arr.shape, "selections")
    positions, seq_ids = _record_ints("positions", positions, R), _record_ints("seq_ids", seq_ids, R)
    arr = _id_array("selections", arr, 3, "[records, layers, k]")
    hashed = set(int_list("hash_layers", hash_layers, lo=0, hi=L - 1))
    cache_sizes, top_n = _cache_sizes(cache_sizes), _top_n(top_n)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a function progress(done, total), got {progress!r}")
    if workers is not None:
        workers = int_arg("workers", workers, lo=1)

    kw = dict(num_experts=num_experts, positions=positions, seq_ids=seq_ids, hashed=hashed, cache_sizes=cache_sizes,
              top_n=top_n)
    n_workers = max(1, min(L, workers if workers is not None else _default_workers(R, k, num_experts, L)))
    layers = [None] * L
    for done, out in enumerate(_layer_results(arr, w_all, L, n_workers, kw), 1):
        layers[out["layer"]] = out
        if progress is not None:
            progress(done, L)
    return assemble_report(layers, num_experts, k, R, source=source, model=model)


def _layer_results(arr, w_all, L, n_workers, kw):
    """Each layer's statistics as they finish: in this thread (one worker), in forked worker
    processes, or in threads where fork is not available or other Python threads run."""
    if n_workers == 1:
        ws = Workspace()
        for layer in range(L):
            yield _one_layer(arr, w_all, layer, ws, **kw)
    elif _can_fork():
        # worker processes forked with the arrays in memory (nothing copied or pickled on the way
        # in; each result is a small dict): no GIL between them, unlike threads, which spend most
        # of their time waiting for it between numpy calls on many cores.  multiprocessing.Pool
        # forks all its workers before it starts its own threads.
        import multiprocessing

        with warnings.catch_warnings():  # Python >= 3.12 warns on fork with native threads (see _can_fork)
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pool = multiprocessing.get_context("fork").Pool(n_workers, initializer=_fork_job,
                                                            initargs=(arr, w_all, kw))
        with pool:
            yield from pool.imap_unordered(_forked_layer, range(L))
    else:
        local = threading.local()  # one scratch workspace per worker thread, freed with the pool

        def in_thread(layer):
            ws = getattr(local, "ws", None)
            if ws is None:
                ws = local.ws = Workspace()
            return _one_layer(arr, w_all, layer, ws, **kw)

        with ThreadPoolExecutor(max_workers=n_workers) as ex:
            for fut in as_completed([ex.submit(in_thread, layer) for layer in range(L)]):
                yield fut.result()


def _id_array(name: str, a, ndim: int, shape: str) -> np.ndarray:
    """``a`` as a numpy array of ``ndim`` dimensions holding integer expert ids, or an error
    naming it (float ids would be truncated, bools are no ids)."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert ids, got dtype {a.dtype}")
    return a


def _check_weights(weights, shape: tuple, of: str = "ids") -> Optional[np.ndarray]:
    """``weights`` as a numpy array of ``shape`` with real numbers, None if None."""
    if weights is None:
        return None
    w = np.asarray(weights)
    if w.shape != tuple(shape):
        raise ValueError(f"weights must have the shape of {of} {tuple(shape)}, got {w.shape}")
    if w.dtype.kind not in "iuf":
        raise TypeError(f"weights must be real numbers, got dtype {w.dtype}")
    return w


def _record_ints(name: str, v, R: int) -> Optional[np.ndarray]:
    """Per-record ``positions`` / ``seq_ids``: integers of shape ``(R,)``, None if None."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.shape != (R,):
        raise ValueError(f"{name} must have shape ({R},), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers (float values would be truncated), got dtype {a.dtype}")
    return a


def _cache_sizes(v) -> list[int]:
    return int_list("cache_sizes", v, lo=1)


def _top_n(v):
    """``"all"`` or an int >= 0."""
    return v if isinstance(v, str) and v == "all" else int_arg("top_n (or 'all')", v, lo=0)


def _one_layer(arr, w_all, layer, ws, *, num_experts, positions, seq_ids, hashed, cache_sizes, top_n):
    # one strided pass into a contiguous [records, k] copy: every later pass over a strided view
    # would read a cache line per record (rows are layers * k bytes apart)
    return {"layer": layer, **layer_stats(
        np.ascontiguousarray(arr[:, layer, :]), num_experts,
        weights=None if w_all is None else np.ascontiguousarray(w_all[:, layer, :]),
        positions=positions, seq_ids=seq_ids, hash_router=layer in hashed, cache_sizes=cache_sizes,
        top_n=top_n, workspace=ws)}


def _scratch_bytes(records: int, k: int, num_experts: int) -> int:
    """About what one worker's scratch holds for one layer (slot prefix / suffix rows, the record
    table's levels, the sort keys): ~0.7 GB per million records at k = 6, E = 256."""
    W = (num_experts + 63) // 64
    return 8 * W * records * (2 * k + 9) + 2 * records * k


def _available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _default_workers(records: int, k: int, num_experts: int, layers: int) -> int:
    """min(16, cores, layers), and no more than 70% of the available memory holds in scratch."""
    n = min(16, os.cpu_count() or 1, layers)
    avail = _available_memory()
    if avail is not None:
        n = min(n, int(0.7 * avail // max(1, _scratch_bytes(records, k, num_experts))))
    return max(1, n)


def _can_fork() -> bool:
    """Worker processes by fork: where the platform has it and this process runs no other Python
    thread (whose locks a forked child could inherit held).  Native threads of BLAS pools or a
    CUDA context are idle or unused by the children, which only run numpy on inherited arrays."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


_job = None  # in a forked worker: (arr, w_all, kw, workspace)


def _fork_job(arr, w_all, kw):
    global _job
    _job = (arr, w_all, kw, Workspace())


def _forked_layer(layer):
    arr, w_all, kw, ws = _job
    return _one_layer(arr, w_all, layer, ws, **kw)


def assemble_report(layers: list, num_experts: int, k: int, records: int, *, source: str = "", model: str = "") -> dict:
    """The JSON document around per-layer results (shared with the GPU recorder)."""
    sizes = [c["size"] for c in layers[0]["cache"]] if layers else []
    total_sel = sum(x["selections"] for x in layers)
    summary = []
    for j, n in enumerate(sizes):
        hits = sum(x["cache"][j]["hits"] for x in layers)
        summary.append({"size": n, "hits": hits, "hit_rate": hits / total_sel if total_sel else None})
    return {"schema_version": SCHEMA_VERSION, "source": source, "model": model, "layers": len(layers),
            "experts": num_experts, "k": k, "records": records, "selections": total_sel, "cache_sizes": sizes,
            "cache_summary": summary, "definitions": DEFINITIONS, "layers_detail": layers}


def summary_text(report: dict, top: int = 3) -> str:
    """A plain-text table for the terminal."""
    if not isinstance(report, dict) or not {"layers", "experts", "k", "records", "layers_detail"} <= set(report):
        raise ValueError("report must be a locality report (the dict analyze() returns)")
    lines = [f"{report.get('model') or 'model'}: {report['layers']} layers, E={report['experts']}, "
             f"k={report['k']}, {report['records']} records, {report['selections']} selections",
             f"{'layer':>5} {'hash':>4} {'uniq':>5} {'H/lnE':>6} {'overlap':>7} {'jaccard':>7} {'stab':>6}  "
             f"hit@{{{','.join(str(s) for s in report['cache_sizes'][:6])}}}  top experts (pct)"]

    def f(v, w=7, p=3):
        return f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'-':>{w}}"

    for x in report["layers_detail"]:
        hits = ",".join(f"{c['hit_rate']:.2f}" if c["hit_rate"] is not None else "-" for c in x["cache"][:6])
        tops = " ".join(f"{t['id']}({t['pct']:.1f})" for t in x["top_experts"][:top])
        lines.append(f"{x['layer']:>5} {'yes' if x['hash_router'] else 'no':>4} {x['unique_experts']:>5} "
                     f"{f(x['entropy_ratio'], 6)} {f(x['overlap'])} {f(x['jaccard'])} {f(x['position_stability'], 6)}  "
                     f"{hits}  {tops}")
    lines.append("cache summary: " + ", ".join(
        f"{c['size']}: {c['hit_rate']:.3f}" for c in report["cache_summary"] if c["hit_rate"] is not None))
    return "\n".join(lines)


def render_png(report: dict, path) -> None:
    """A PNG: expert frequency heat map per layer, and LRU hit rate against cache size.

    Needs matplotlib (``pip install 'ds4kern[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised where matplotlib is missing
        raise ImportError("the PNG needs matplotlib: pip install 'ds4kern[plot]'") from e
    layers = report["layers_detail"]
    heat = np.array([np.asarray(x["hist"], np.float64) / max(1, x["selections"]) * 100 for x in layers])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    im = ax0.imshow(heat, aspect="auto", interpolation="nearest", cmap="viridis")
    ax0.set_xlabel("expert id")
    ax0.set_ylabel("layer")
    ax0.set_title("expert frequency (% of the layer's selections)")
    fig.colorbar(im, ax=ax0, fraction=0.04)
    sizes = report["cache_sizes"]
    for x in layers:
        ax1.plot(sizes, [c["hit_rate"] or 0 for c in x["cache"]], color="0.75", lw=0.8)
    ax1.plot(sizes, [c["hit_rate"] or 0 for c in report["cache_summary"]], color="C3", lw=2.5, label="all layers")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("LRU cache size (experts)")
    ax1.set_ylabel("hit rate")
    ax1.set_ylim(0, 1)
    ax1.set_title("hit rate against cache size (grey: each layer)")
    ax1.legend(loc="lower right")
    fig.suptitle(f"{report.get('model') or report.get('source') or 'routing'}: {report['records']} records, "
                 f"E={report['experts']}, k={report['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_selections(path):
    """``(array [records, layers, k], start)`` from a routing-replay payload (.json) or a
    capture saved with ``numpy.save`` (.npy)."""
    import json
    from pathlib import Path

    from ..replay import decode_payload

    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 3:
            raise ValueError(f"a capture must have shape [records, layers, k], got {arr.shape}")
        return arr, 0
    with open(p) as f:
        payload = json.load(f)
    return decode_payload(payload)


def main(argv=None) -> int:
    """``python -m ds4kern profile FILE --out report.json [--png report.png]`` (options: ``--help``)."""
    import sys

    from ..__main__ import main as cli

    return cli(["profile", *(sys.argv[1:] if argv is None else argv)])
