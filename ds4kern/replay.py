"""Routed-expert capture and attribution for rollout routing replay.

An inference engine returns, per request, the experts every token used in every MoE layer: an
integer array ``[rows, layers, k]`` (uint8 when E <= 256, uint16 above), possibly one row short
because the last sampled token never had a forward pass.  This module

- decodes and encodes the engine's payload ``{data (base64), shape, dtype, start}``;
- attributes a payload to the new nodes of a conversation path (the lazy last-row padding rule:
  only the final token-bearing node is padded, by repeating the last row, and only when the
  payload is exactly one row short; nothing the size of the full context is allocated);
- assembles node arrays along a path (all or nothing);
- captures routing on the GPU: :class:`RoutingCapture` is a ``[max_tokens, layers, k]`` device
  buffer that the routers fill in place through their index output (no extra kernel).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from .core.args import is_int as _is_int
from .core.arrays import require_cupy

__all__ = [
    "PAYLOAD_DTYPES",
    "decode_payload",
    "encode_payload",
    "attribute_routing",
    "assemble_path",
    "RoutingCapture",
]

PAYLOAD_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}
_FIELDS = ("data", "shape", "dtype", "start")


def decode_payload(payload: Mapping) -> tuple[np.ndarray, int]:
    """``(array [rows, layers, k], start)`` from an engine payload.

    The array is read-only and wraps the decoded bytes (one decode, no further copy); the
    attribution hands out owned copies.  Raises ``ValueError``/``TypeError`` naming the field.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping with fields {_FIELDS}, got {type(payload).__name__}")
    unknown = set(payload) - set(_FIELDS)
    if unknown:
        raise ValueError(f"payload has unknown field(s) {sorted(unknown)}; known: {list(_FIELDS)}")
    if "data" not in payload:
        raise ValueError("payload field 'data' is missing")
    if "shape" not in payload:
        raise ValueError("payload field 'shape' is missing")
    dtype_name = payload.get("dtype", "uint8")
    if dtype_name is None:
        dtype_name = "uint8"
    if not isinstance(dtype_name, str) or dtype_name not in PAYLOAD_DTYPES:
        raise ValueError(f"payload field 'dtype' must be one of {list(PAYLOAD_DTYPES)}, got {dtype_name!r}")
    dt = PAYLOAD_DTYPES[dtype_name]
    shape = payload["shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"payload field 'shape' must be three non-negative ints [rows, layers, k], got {shape!r}")
    shape = tuple(int(d) for d in shape)
    start = payload.get("start", 0)
    if start is None:
        start = 0
    if not _is_int(start) or start < 0:
        raise ValueError(f"payload field 'start' must be a non-negative int, got {start!r}")
    data = payload["data"]
    if isinstance(data, str):
        data = data.encode("ascii", errors="strict") if data.isascii() else None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError("payload field 'data' must be base64 text (str or bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"payload field 'data' is not valid base64: {e}") from None
    want = math.prod(shape) * dt.itemsize
    if len(raw) != want:
        raise ValueError(f"payload field 'data' holds {len(raw)} bytes, but shape {list(shape)} of "
                         f"{dtype_name} needs {want}")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape)
    return arr, int(start)


def encode_payload(arr, start: int = 0) -> dict:
    """The engine payload for a ``[rows, layers, k]`` uint8/uint16 array (numpy or CuPy)."""
    if hasattr(arr, "get") and not isinstance(arr, np.ndarray):  # CuPy: one device-to-host copy
        arr = arr.get()
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"arr must have shape [rows, layers, k], got {arr.shape}")
    name = {np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16"}.get(arr.dtype)
    if name is None:
        raise TypeError(f"arr must be uint8 or uint16, got {arr.dtype}")
    if not _is_int(start) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    data = np.ascontiguousarray(arr, dtype=PAYLOAD_DTYPES[name]).tobytes()
    return {"data": base64.b64encode(data).decode("ascii"), "shape": list(arr.shape), "dtype": name,
            "start": int(start)}


def _xp(arr):
    """numpy for host arrays, cupy for device arrays (attribution works on either)."""
    if isinstance(arr, np.ndarray):
        return np
    import cupy

    return cupy


def attribute_routing(arr: Optional[np.ndarray], path_len: int, node_tokens: Sequence[int],
                      start: int = 0) -> list:
    """Distribute a decoded payload over the new nodes of a path.

    Args:
        arr: ``[rows, layers, k]`` payload array (numpy, or CuPy for a device-side replay), or
            None (no payload: nothing is set).
        path_len: tokens already carried by the reused prefix of the path.
        node_tokens: token count of each new node, in path order.
        start: token offset at which the payload's rows begin.

    Returns one entry per node: an owned array ``[n, layers, k]`` or None (unset).  With
    ``off = path_len - start`` and ``needed = off + sum(n)``, a node ``[off, off + n)`` gets
    ``arr[off:off+n]`` when that lies inside the payload; the final token-bearing node gets
    ``arr[off:]`` plus a repeat of the last row when the payload is exactly one row short;
    everything else stays unset.  Only the final node's slice is ever copied with padding.
    """
    for name, v in (("path_len", path_len), ("start", start)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    ns = list(node_tokens)
    for n in ns:
        if not _is_int(n) or n < 0:
            raise ValueError(f"node_tokens must be non-negative ints, got {n!r}")
    out: list = [None] * len(ns)
    if arr is None:
        return out
    if not hasattr(arr, "ndim"):
        raise TypeError(f"arr must be a numpy or CuPy array [rows, layers, k] (or None), got {type(arr).__name__}")
    if arr.ndim != 3:
        raise ValueError(f"arr must have shape [rows, layers, k], got {getattr(arr, 'shape', None)}")
    rows = int(arr.shape[0])
    off = int(path_len) - int(start)
    needed = off + sum(ns)
    for i, n in enumerate(ns):
        end = off + n
        if n and 0 <= off and end <= rows:
            out[i] = arr[off:end].copy()
        elif n and rows and 0 <= off and end == needed == rows + 1:
            node = _xp(arr).empty((n,) + tuple(arr.shape[1:]), arr.dtype)
            node[:-1] = arr[off:]
            node[-1] = arr[-1]
            out[i] = node
        off = end
    return out


def assemble_path(node_arrays: Sequence[Optional[np.ndarray]], node_tokens: Sequence[int]) -> Optional[np.ndarray]:
    """Concatenate node routing along a path: ``[tokens, layers, k]``, or None unless every
    token-bearing node has routing of exactly its token count (None too when no node holds
    tokens: there is nothing to give a shape)."""
    arrays, ns = list(node_arrays), list(node_tokens)
    if len(arrays) != len(ns):
        raise ValueError(f"node_arrays has {len(arrays)} entries but node_tokens has {len(ns)}")
    parts = []
    for a, n in zip(arrays, ns):
        if not n:
            continue
        if a is None or a.ndim != 3 or a.shape[0] != n:
            return None
        parts.append(a)
    if not parts:
        return None
    if len({tuple(p.shape[1:]) for p in parts}) != 1 or len({p.dtype for p in parts}) != 1:
        return None
    return _xp(parts[0]).concatenate(parts, axis=0)


class RoutingCapture:
    """A device buffer ``[max_tokens, layers, k]`` that routers fill in place.

    Each MoE layer's router call writes its top-k indices straight into this layer's strided
    slice ``buffer[row:row+T, layer, :]`` through the router's index output, so capture costs no
    kernel of its own.  dtype: uint8 when ``num_experts <= 256``, else uint16 (or as given).
    Needs CuPy (without it, an ImportError says how to install it).

    >>> cap = RoutingCapture(max_tokens=4096, num_layers=43, topk=6, num_experts=256)
    >>> w, _ = cap.route(3, logits, score_function="sqrtsoftplus", expert_bias=b, row=pos)
    >>> payload = cap.payload(num_tokens, drop_last=True)
    """

    def __init__(self, max_tokens: int, num_layers: int, topk: int, num_experts: int, dtype=None):
        for name, v in (("max_tokens", max_tokens), ("num_layers", num_layers), ("topk", topk),
                        ("num_experts", num_experts)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype is None:
            dtype = np.uint8 if num_experts <= 256 else np.uint16
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise TypeError(f"dtype must be uint8 or uint16, got {dt}")
        if num_experts > np.iinfo(dt).max + 1:
            raise ValueError(f"dtype {dt} cannot name {num_experts} experts")
        cp = require_cupy("ds4kern.replay.RoutingCapture (a device buffer the routers write into)")
        self.num_layers, self.topk, self.num_experts = int(num_layers), int(topk), int(num_experts)
        self.buffer = cp.empty((int(max_tokens), self.num_layers, self.topk), dt)

    @property
    def max_tokens(self) -> int:
        return int(self.buffer.shape[0])

    def indices_out(self, layer: int, row: int, num_rows: int):
        """The strided ``[num_rows, k]`` slice of ``layer`` starting at token ``row``."""
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        if not _is_int(row) or row < 0 or row + num_rows > self.max_tokens:
            raise ValueError(f"rows [{row}, {row + num_rows}) do not fit max_tokens={self.max_tokens}")
        return self.buffer[row:row + num_rows, layer, :]

    def route(self, layer: int, logits, *, row: int = 0, weights_out=None, **router_kwargs):
        """``router_topk`` for one layer, its indices written into the capture buffer.

        ``logits`` is ``[T, E]`` for the tokens at positions ``row .. row+T-1``; keyword arguments
        go to :func:`ds4kern.router_topk` (score function, bias, scaling, variant).  Returns
        ``(weights, indices)``, the indices being a view of the buffer.
        """
        from .ops.router import router_topk

        T = int(logits.shape[0])
        view = self.indices_out(layer, row, T)
        return router_topk(logits, self.topk, out=(weights_out, view), **router_kwargs)

    def route_hash(self, layer: int, logits, tid2eid, token_ids, *, row: int = 0, weights_out=None,
                   **router_kwargs):
        """``router_hash`` for a hash-routed layer, its table lookups written into the buffer."""
        from .ops.router_hash import router_hash

        T = int(logits.shape[0])
        if int(tid2eid.shape[1]) != self.topk:
            raise ValueError(f"tid2eid has {tid2eid.shape[1]} columns, the capture holds k={self.topk}")
        view = self.indices_out(layer, row, T)
        return router_hash(logits, tid2eid, token_ids, out=(weights_out, view), **router_kwargs)

    def rows(self, num_tokens: int, drop_last: bool = False, start: int = 0):
        """The device view ``[rows, layers, k]`` of tokens ``start .. num_tokens-1`` (the last one
        left out with ``drop_last``); e.g. for the locality profiler."""
        if not _is_int(num_tokens) or not 0 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be in [0, {self.max_tokens}], got {num_tokens!r}")
        if not _is_int(start) or not 0 <= start <= num_tokens:
            raise ValueError(f"start must be in [0, num_tokens={num_tokens}], got {start!r}")
        end = max(start, num_tokens - 1) if drop_last else num_tokens
        return self.buffer[start:end]

    def payload(self, num_tokens: int, drop_last: bool = False, start: int = 0) -> dict:
        """The engine payload of tokens ``start .. num_tokens-1`` (one device-to-host copy); with
        ``drop_last`` the last token's row is left out, as engines do."""
        return encode_payload(self.rows(num_tokens, drop_last, start), start=start)
