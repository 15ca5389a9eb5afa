"""Online expert-locality recording on the GPU: feed router outputs as they are made, read a
report when you want one.

    rec = ds4kern.LocalityRecorder(num_layers=43, num_experts=256, topk=6, hash_layers=(0, 1, 2))
    for step ...:
        for layer ...:
            w, i = ds4kern.router_topk(h, 6, ...)
            rec.record(layer, i, weights=w, positions=pos, seq_ids=seq)   # 2 launches, no sync
        # or: routers write into cap[:, layer] (out= views), then once per step
        # rec.record_step(cap, weights=capw, positions=pos, seq_ids=seq)  # 2 launches per step
        # or, beside the next steps' work: cap, capw = rec.step_buffers(T) before the routers,
        # rec.record_step(cap, weights=capw, ..., overlap=True) after them
    report = rec.report(model="DeepSeek-V4-Flash")      # the same JSON as ds4kern.locality.analyze

Per layer the device keeps: expert histogram and weight sums, the LRU stack-distance histogram
(and its weight sums), adjacent-pair counters (intersection/union histogram, same-slot matches),
the last access time of every expert, and each sequence's previous record.  ``record`` (one
layer) and ``record_step`` (several layers of one step) each launch two kernels
(``cuda_src/locality.cu``) on the current stream and never synchronise; ``report`` copies the
counters to the host.  Every count equals what :func:`ds4kern.locality.analyze` finds
in the same selections (weight sums: exact 32.32 fixed point within a block for weights of size
2^-9 .. 2^12, float64 across blocks and for other weights: equal to float64 sums up to rounding
order).

Semantics as offline, with one condition: within one call the records of a sequence
are contiguous and in increasing position order (true for decode batches and prefill chunks),
and a sequence's positions keep increasing across calls.  Records without ``positions`` get
consecutive positions per layer; without ``seq_ids`` they all belong to sequence 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core import kernels
from ..core.args import int_arg, int_list
from ..core.arrays import Frame, dtype_name, require_cupy
from ..ops.router.api import IDX_KIND as _IDX_KIND  # DS4_IDX_* in cuda_src/common/common.cuh
from .analysis import _cache_sizes, _top_n, assemble_report, layer_from_counts

__all__ = ["LocalityRecorder"]

_WORDS = (1, 2, 4, 8, 16)  # E <= 32 * W: a warp's lanes hold W experts each
_GP = 8  # parts per block (one warp each; DS4_LOC_GP in cuda_src/locality/)
_MAX_BLOCKS = 256  # blocks of parts per layer and call: an accumulate block's walk back is at most this long
_MAX_KEYS = 1 << 15  # slots per part (P * k): at most 2^18 a block (the kernels' float division is exact below 2^22)
_STAGE_SMEM = 96 * 1024  # accumulate blocks up to this size keep their parts' ids in shared memory

PREPARE_KERNELS = kernels.register_family(kernels.KernelFamily(
    "locality/prepare.cu", tuple(f"locality_prepare<{w}>" for w in _WORDS)))
ACCUMULATE_KERNELS = kernels.register_family(kernels.KernelFamily(
    "locality/accumulate.cu", tuple(f"locality_accumulate<{w}>" for w in _WORDS)))


def _a16(n: int) -> int:
    return (n + 15) & ~15


def _accumulate_smem(E: int, W: int, adj_len: int, part_keys: int, stage_keys: int = 0) -> int:
    """Bytes of shared memory of one ``locality_accumulate`` block (``ds4_acc_layout``) for parts of
    ``part_keys`` slots (P * k); with ``stage_keys`` (P * k) each warp keeps its part's ids for the
    adjacency."""
    nm = (part_keys + 31) // 32
    per_warp = 2 * _a16(4 * E) + _a16(4 * nm) + _a16(4 * (nm + 1)) + 2 * _a16(4 * W) + _a16(2 * stage_keys)
    return (_a16(8 * E) + _a16(8 * (E + 1)) + _a16(4 * E) + _a16(4 * (E + 1)) + _a16(4 * adj_len)
            + _a16(4 * 32 * -(-E // 32)) + _a16(4 * E) + _GP * per_warp)


def _adj_len(k: int) -> int:
    """Adjacency counters per layer: pairs, equal slots, then (|A & B|, |A | B|) pairs."""
    return 2 + (k + 1) * (2 * k + 1)


def _words(E: int) -> int:
    """32-bit words of a bitmap over E + 1 ranks' worth of experts: E <= 32 W."""
    return next(w for w in _WORDS if 32 * w >= E)


_PREP_BITMAPS = 48 * 1024  # bytes of prefix bitmaps and their suffix counts a locality_prepare batch may take
_PREP_STAGE = 32 * 1024  # locality_prepare keeps its block's ids (int16) in shared memory up to this size
_PREP_STATIC = 8 * 512  # locality_prepare's static shared memory (its extra block's table of last accesses)


def _prepare_plan(k: int, part: int) -> tuple[int, bool]:
    """``(nbp, stage)`` of a ``locality_prepare`` block: prefixes whose bitmaps it builds at once (at
    most 7), and whether it keeps its ids in shared memory (else it reads them twice)."""
    nw = (_GP * part * k + 31) // 32
    return max(1, min(_GP - 1, _PREP_BITMAPS // (8 * nw))), 2 * _GP * part * k <= _PREP_STAGE


def _prepare_smem(E: int, k: int, part: int) -> int:
    """Bytes of shared memory of one ``locality_prepare`` block of parts (its carve in locality.cu)."""
    nbp, stage = _prepare_plan(k, part)
    nw = (_GP * part * k + 31) // 32
    return _a16(4 * _GP * E) + _a16(_GP * E) + 2 * _a16(4 * nbp * nw) + (_a16(2 * _GP * part * k) if stage else 0)


def _smem_optin(attrs) -> int:
    """The most dynamic shared memory one block may opt in to on a device (48 kB if not listed)."""
    return int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))


def _plan(E: int, k: int, T: int, layers: int, sms: int, have: int, part: int | None = None) -> int:
    """Records per part (one warp each, 8 parts a block) for a call of ``T`` records of ``layers``
    layers: ~16 warps per SM in all (parts of 4 .. 128 records, a power of two), larger where a
    layer would have more than ``_MAX_BLOCKS`` blocks.  Measured (bench/locality/PERFORMANCE.md, H100, 43 layers):
    T=4096 takes 64 (32: 2 waves, 128: chains twice as long), T=64 takes 4."""
    if part is None:
        want = T * layers / (16 * sms)
        part = 4
        while part < 128 and part * 1.5 < want:
            part *= 2
        part = max(part, -(-T // (_GP * _MAX_BLOCKS)))
    if (part * k > _MAX_KEYS or _prepare_smem(E, k, part) + _PREP_STATIC > have
            or _accumulate_smem(E, _words(E), _adj_len(k), part * k) > have):
        raise ValueError(f"a call of {T} records needs parts of {part} records; at most {_MAX_KEYS // k} (and "
                         f"{have} bytes of shared memory) are possible: record fewer records per call")
    return part


class LocalityRecorder:
    """Accumulates locality statistics of router outputs on the current CUDA device (needs CuPy:
    without it, an ImportError says how to install it).

    Args:
        num_layers, num_experts (E <= 512), topk (k <= 32).
        cache_sizes: LRU sizes (ints >= 1) besides the powers of two up to E.
        hash_layers: hash-routed layers in ``[0, num_layers)`` (flagged in the report).
        max_sequences: sequence ids must lie in ``[0, max_sequences)`` (others are skipped for
            adjacency).
    """

    def __init__(self, num_layers: int, num_experts: int, topk: int, *, cache_sizes: Sequence[int] = (),
                 hash_layers: Sequence[int] = (), max_sequences: int = 4096):
        num_layers = int_arg("num_layers", num_layers, lo=1)
        num_experts = int_arg("num_experts", num_experts, lo=1, hi=512)
        topk = int_arg("topk", topk, lo=1, hi=32)
        max_sequences = int_arg("max_sequences", max_sequences, lo=1)
        if topk > num_experts:
            raise ValueError(f"topk={topk} exceeds num_experts={num_experts}")
        self.cache_sizes = tuple(_cache_sizes(cache_sizes))
        self.hash_layers = set(int_list("hash_layers", hash_layers, lo=0, hi=num_layers - 1))
        cp = require_cupy("ds4kern.LocalityRecorder (it counts on the device)")
        self.cp = cp
        self.L, self.E, self.k, self.S = num_layers, num_experts, topk, max_sequences
        self.W = _words(num_experts)
        self.device = cp.cuda.runtime.getDevice()
        L, E, k = self.L, self.E, self.k
        self.hist = cp.zeros((L, E), cp.uint64)
        self.wsum = cp.zeros((L, E), cp.float64)
        self.dist = cp.zeros((L, E + 1), cp.uint64)
        self.wdist = cp.zeros((L, E + 1), cp.float64)
        self.adj = cp.zeros((L, _adj_len(k)), cp.uint64)
        self.last = cp.full((L, 2, E), -1, cp.int64)
        self.prev_pos = cp.full((L, max_sequences), -(1 << 62), cp.int64)
        self.prev_ids = cp.full((L, max_sequences, k), -1, cp.int32)
        self.rank = cp.zeros((L, E), cp.int32)
        self.records = [0] * L
        self.clock = [0] * L
        self.parity = [0] * L
        self.has_weights = [False] * L
        attrs = cp.cuda.Device(self.device).attributes
        self._sms = attrs["MultiProcessorCount"]
        need = _accumulate_smem(E, self.W, self.adj.shape[1], 4 * k)  # the smallest parts
        have = _smem_optin(attrs)
        if need > have:
            raise ValueError(f"num_experts={E} with topk={k} needs {need} bytes of shared memory per block; this "
                             f"device allows {have}: use fewer experts or a smaller topk")
        self._smem_have = have
        self._records_per_part = None  # tests may force the part size (records)
        self._side = None  # the stream of record_step(..., overlap=True), made on first use
        self._side_last = None  # the event after its last recording
        self._rings = {}  # (T, dtype) -> two step buffers (see step_buffers)

    def step_buffers(self, T: int, dtype=None):
        """Capture buffers for one step's routers to write into, for ``record_step(...,
        overlap=True)``: ``(indices, weights)``, each ``[T, num_layers, topk]`` (``dtype``: uint8
        where E <= 256, else int16; float32 weights), taken in turn from two per (T, dtype).
        Before handing one out, the current stream waits until the recording that last read it
        is done (a stream wait, no host synchronisation)."""
        cp = self.cp
        T = int_arg("T", T, lo=0)
        dt = np.dtype(dtype if dtype is not None else (np.uint8 if self.E <= 256 else np.int16))
        if dt.name not in _IDX_KIND:
            raise ValueError(f"dtype must be one of {sorted(_IDX_KIND)}, got {dt.name}")
        if np.iinfo(dt).max < self.E - 1:
            raise ValueError(f"dtype {dt.name} cannot hold expert ids up to {self.E - 1}")
        with cp.cuda.Device(self.device):
            ring = self._rings.get((T, dt.name))
            if ring is None:
                ring = self._rings[(T, dt.name)] = {"next": 0, "slots": [
                    {"ids": cp.empty((T, self.L, self.k), dt), "w": cp.empty((T, self.L, self.k), cp.float32),
                     "pos": None, "seq": None, "done": None} for _ in range(2)]}
            slot = ring["slots"][ring["next"]]
            ring["next"] ^= 1
            if slot["done"] is not None:
                cp.cuda.get_current_stream().wait_event(slot["done"])
                slot["done"] = None
            return slot["ids"], slot["w"]

    def join(self) -> None:
        """Make the current stream wait for every ``overlap=True`` recording made so far (call it
        before ending a CUDA-graph capture that recorded with overlap, or before reusing a step
        buffer's inputs some other way).  No host synchronisation."""
        if self._side_last is not None:
            with self.cp.cuda.Device(self.device):
                self.cp.cuda.get_current_stream().wait_event(self._side_last)
        self._side_last = None
        for ring in self._rings.values():
            for slot in ring["slots"]:
                slot["done"] = None

    def _slot_of(self, arr):
        """The step-buffer slot whose indices or weights hold ``arr``'s first element, or None."""
        ptr = arr.data.ptr
        for ring in self._rings.values():
            for slot in ring["slots"]:
                for key in ("ids", "w"):
                    a = slot[key]
                    if a.data.ptr <= ptr < a.data.ptr + max(a.nbytes, 1):
                        return slot, key
        return None, None

    def reset(self) -> None:
        """Forget everything recorded."""
        self.join()
        for a in (self.hist, self.wsum, self.dist, self.wdist, self.adj):
            a.fill(0)
        self.last.fill(-1)
        self.prev_pos.fill(-(1 << 62))
        self.prev_ids.fill(-1)
        self.records = [0] * self.L
        self.clock = [0] * self.L
        self.parity = [0] * self.L
        self.has_weights = [False] * self.L

    def record(self, layer: int, indices, *, weights=None, positions=None, seq_ids=None) -> None:
        """Add one router output of ``layer``: ``indices`` ``[T, k]`` (any integer dtype, may be a
        strided view such as a routing-capture slice), optional float32 ``weights`` ``[T, k]``,
        ``positions`` and ``seq_ids`` int32/int64 ``[T]``.  Two launches on the current stream."""
        layer = int_arg("layer", layer, lo=0, hi=self.L - 1)
        self._record(layer, 1, indices, weights, positions, seq_ids, step=False)

    def record_step(self, indices, *, weights=None, positions=None, seq_ids=None, first_layer: int = 0,
                    overlap: bool = False) -> None:
        """Add one step's router outputs of several layers at once: ``indices`` ``[T, n, k]`` for
        layers ``first_layer .. first_layer + n - 1`` (e.g. a routing-capture buffer ``[T, layers,
        k]`` that the routers filled through their ``out=`` views, any integer dtype, strided views
        allowed), optional float32 ``weights`` ``[T, n, k]``, ``positions`` / ``seq_ids`` ``[T]``
        shared by the layers.  Two launches in all, whatever ``n``; the same counts as ``n`` calls
        of :meth:`record`.  The layers must have been recorded equally often so far.

        ``overlap=True``: the two kernels run on the recorder's own stream, after the work queued
        so far on the current stream and beside what follows (the next layers' or steps' work);
        ``indices`` (and ``weights``) must come from :meth:`step_buffers`, which holds a buffer
        back until its recording has read it; ``positions`` / ``seq_ids`` are copied first.
        Other calls, :meth:`report` and :meth:`reset` wait for these recordings on the device."""
        first_layer = int_arg("first_layer", first_layer, lo=0, hi=self.L - 1)
        shape = getattr(indices, "shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(f"indices must have shape [T, layers, {self.k}], got {shape!r}")
        n = int(shape[1])
        if not 1 <= n <= self.L - first_layer:
            raise ValueError(f"indices cover {n} layers from first_layer={first_layer}; the recorder has {self.L}")
        span = range(first_layer, first_layer + n)
        if len({(self.records[x], self.parity[x]) for x in span}) != 1:
            raise ValueError("record_step needs layers recorded equally often so far (mixing record() calls "
                             f"for some of layers {first_layer}..{first_layer + n - 1}); record them per layer")
        self._record(first_layer, n, indices, weights, positions, seq_ids, step=True, overlap=overlap)

    def _record(self, layer0, n, indices, weights, positions, seq_ids, *, step, overlap=False):
        cp = self.cp
        frame = Frame(indices, "indices")
        if frame.backend != "cuda":
            raise TypeError("indices must be a GPU array (the recorder runs on the device); use "
                            "ds4kern.locality.analyze for host arrays")
        if frame.device_id != self.device:
            raise ValueError(f"indices are on device {frame.device_id}, the recorder's counters on device {self.device}")
        ids = frame.array
        want = f"[T, {n}, {self.k}]" if step else f"[T, {self.k}]"
        want_shape = (n, self.k) if step else (self.k,)
        ok_shape = ids.ndim == 1 + len(want_shape) and tuple(ids.shape[1:]) == want_shape
        if not ok_shape or dtype_name(ids.dtype) not in _IDX_KIND:
            raise ValueError(f"indices must be an integer array of shape {want}, got "
                             f"{dtype_name(ids.dtype)} {tuple(ids.shape)}")
        T = int(ids.shape[0])
        if T == 0:
            return
        span = range(layer0, layer0 + n)
        w = None
        if weights is not None:
            w = frame.convert(weights, "weights")
            if w.dtype != np.float32 or tuple(w.shape) != tuple(ids.shape):
                raise ValueError(f"weights must be float32 of shape {tuple(ids.shape)}, got {dtype_name(w.dtype)} "
                                 f"{tuple(w.shape)}")
        for x in span:
            if self.has_weights[x] and w is None:
                raise ValueError(f"layer {x} was recorded with weights before; give weights every time")
        slot = None
        if overlap:
            slot, key = self._slot_of(ids)
            wslot, wkey = self._slot_of(w) if w is not None else (slot, "w")
            if slot is None or key != "ids" or wslot is not slot or wkey != "w":
                raise ValueError("overlap=True needs indices (and weights) from one step_buffers() pair: the "
                                 "recording reads them after this call returns")

        def vec(x, name):
            if x is None:
                return None
            v = frame.convert(x, name)
            if v.dtype not in (np.int32, np.int64) or tuple(v.shape) != (T,):
                raise ValueError(f"{name} must be int32/int64 of shape ({T},), got {dtype_name(v.dtype)} {tuple(v.shape)}")
            return cp.ascontiguousarray(v)

        pos, seq = vec(positions, "positions"), vec(seq_ids, "seq_ids")
        k = self.k
        item = ids.itemsize
        i_rs, i_cs = ids.strides[0] // item, ids.strides[-1] // item
        i_ls = ids.strides[1] // item if step else 0
        if w is not None:
            w_rs, w_cs = w.strides[0] // 4, w.strides[-1] // 4
            w_ls = w.strides[1] // 4 if step else 0
        else:
            w_rs = w_cs = w_ls = 0
        if T * k >= 1 << 31:
            raise ValueError(f"a call holds at most 2**31 - 1 slots (T * k); got T={T}, k={k}: split it")
        P = _plan(self.E, k, T, n, self._sms, self._smem_have, self._records_per_part)  # may refuse the call
        if w is not None:  # every check passed: from here on the call counts
            for x in span:
                self.has_weights[x] = True
        with frame.running():
            main = cp.cuda.get_current_stream()
            if slot is None:
                if self._side_last is not None:  # the recorder's state after the overlapped recordings
                    main.wait_event(self._side_last)
                self._launch(ids, w, pos, seq, layer0, n, T, P, i_rs, i_cs, i_ls, w_rs, w_cs, w_ls)
            else:
                pos, seq = self._keep(slot, "pos", pos, main), self._keep(slot, "seq", seq, main)
                if self._side is None:
                    self._side = cp.cuda.Stream(non_blocking=True)
                ev = cp.cuda.Event(disable_timing=True)
                ev.record(main)
                self._side.wait_event(ev)
                with self._side:
                    self._launch(ids, w, pos, seq, layer0, n, T, P, i_rs, i_cs, i_ls, w_rs, w_cs, w_ls)
                done = cp.cuda.Event(disable_timing=True)
                done.record(self._side)
                slot["done"] = self._side_last = done
        for x in span:
            self.parity[x] ^= 1
            self.records[x] += T
            self.clock[x] += T * k

    def _keep(self, slot, key, v, stream):
        """A copy of ``v`` (positions / seq ids) owned by the step-buffer slot, made on ``stream``."""
        if v is None:
            return None
        have = slot[key]
        if have is None or have.dtype != v.dtype or have.size < v.size:
            have = slot[key] = self.cp.empty(v.size, v.dtype)
        dst = have[:v.size]
        dst.data.copy_from_device_async(v.data, v.nbytes, stream=stream)
        return dst

    def _launch(self, ids, w, pos, seq, layer0, n, T, P, i_rs, i_cs, i_ls, w_rs, w_cs, w_ls):
        """The two kernels of one call (parts of P records), on the current stream."""
        cp = self.cp
        E, k, W = self.E, self.k, self.W
        null = np.uint64(0)
        adj_len = self.adj.shape[1]
        NP = -(-T // P)
        NB = -(-NP // _GP)
        pcum = cp.empty((n, NP, E), cp.int32)
        bmax = cp.empty((n, NB, E), cp.int32)
        snap_pos = cp.empty((n, T), cp.int64)
        snap_ids = cp.empty((n, T, k), cp.int32)
        cids = cp.empty((n, T * k), cp.int16)  # the ids as prepare read them (-1 invalid), for accumulate
        kind = np.int32(_IDX_KIND[dtype_name(ids.dtype)])
        seq_arg = seq if seq is not None else null
        seq64 = np.int32(seq is not None and seq.dtype == np.int64)
        parity = np.int32(self.parity[layer0])
        prep = PREPARE_KERNELS.kernel(f"locality_prepare<{W}>")
        psmem = _prepare_smem(E, k, P)
        nbp, pstage = _prepare_plan(k, P)
        if psmem + _PREP_STATIC > 48 * 1024:  # (48 kB of static and dynamic without opting in)
            prep.max_dynamic_shared_size_bytes = psmem
        prep((NB + 1, n), (256,),
             (ids, kind, np.int64(i_rs), np.int64(i_cs), np.int64(i_ls), np.int64(T), np.int32(k), np.int32(E),
              seq_arg, seq64, np.int64(self.S), self.prev_pos, self.prev_ids, self.last, parity, np.int32(P),
              np.int32(NP), np.int32(NB), pcum, bmax, self.rank, snap_pos, snap_ids, np.int32(layer0), np.int32(nbp),
              np.int32(pstage), cids),
             shared_mem=psmem)
        acc = ACCUMULATE_KERNELS.kernel(f"locality_accumulate<{W}>")
        smem = _accumulate_smem(E, W, adj_len, P * k, P * k)
        stage = smem <= _STAGE_SMEM  # the part's ids kept for the adjacency
        if not stage:
            smem = _accumulate_smem(E, W, adj_len, P * k)
        if smem > 48 * 1024:
            acc.max_dynamic_shared_size_bytes = smem
        acc((NB, n), (256,),
            (w if w is not None else null,
             np.int64(w_rs), np.int64(w_cs), np.int64(w_ls), np.int64(T), np.int32(k), np.int32(E),
             pos if pos is not None else null, np.int32(pos is not None and pos.dtype == np.int64),
             np.int64(self.records[layer0]), seq_arg, seq64, np.int64(self.S), np.int64(self.clock[layer0]),
             self.last, parity, pcum, bmax, self.rank, snap_pos, snap_ids, self.prev_pos,
             self.prev_ids, self.hist, self.wsum, self.dist, self.wdist, self.adj,
             np.int32(adj_len), np.int32(layer0), np.int32(P), np.int32(NP), np.int32(NB), np.int32(stage), cids),
            shared_mem=smem)

    def report(self, *, source: str = "online", model: str = "", top_n=16) -> dict:
        """The report (the schema of :func:`ds4kern.locality.analyze`); synchronises."""
        top_n = _top_n(top_n)
        cp = self.cp
        self.join()
        hist, wsum, dist, wdist, adj = (cp.asnumpy(a) for a in (self.hist, self.wsum, self.dist, self.wdist, self.adj))
        k = self.k
        layers = []
        for layer in range(self.L):
            a = adj[layer]
            hw = self.has_weights[layer]
            layers.append({"layer": layer, **layer_from_counts(
                num_experts=self.E, k=k, records=self.records[layer], hist=hist[layer].astype(np.int64),
                wsum=wsum[layer] if hw else None, dist=dist[layer].astype(np.int64), wdist=wdist[layer] if hw else None,
                pairs=int(a[0]), eq=int(a[1]), iu=a[2:].astype(np.int64).reshape(k + 1, 2 * k + 1),
                hash_router=layer in self.hash_layers, cache_sizes=self.cache_sizes, top_n=top_n)})
        return assemble_report(layers, self.E, k, max(self.records), source=source, model=model)
