"""sparse_attention's reference backend (numpy, float64 accumulation) and the FP8 KV row codec.

FP8 row (584 bytes, FlashMLA's DeepSeek-V4 layout, one whole row per slot): bytes 0-447 the 448
"nope" values in e4m3 (fn: bias 7, max 448, no inf, 0x7f / 0xff NaN), 448-575 the 64 rope values
in bf16 (little-endian, as stored), 576-582 seven ue8m0 scales (byte b means 2^(b - 127); 255 is
NaN), one per 64 nope values, 583 zero.  Packing a 64-value tile: k = the smallest integer with
amax <= 448 * 2^k (amax over the tile's finite values), clamped to [-126, 127]; scale byte k + 127;
each value x / 2^k rounded to the nearest e4m3, ties to even; NaN and inf become 0x7f (NaN).  The CUDA
pack kernel (``cuda_src/sparse_attention/fp8.cu``) gives the same bytes.
"""

from __future__ import annotations

import numpy as np

from ...core.arrays import BFLOAT16

DIM = 512
NOPE = 448
ROPE = 64
TILE = 64
TILES = NOPE // TILE
FP8_ROW = 584
ROPE_OFF = 448
SCALE_OFF = 576
E4M3_MAX = 448.0


# -- e4m3 / ue8m0 codes -------------------------------------------------------------------


def _e4m3_table() -> np.ndarray:
    """float64 value of every e4m3 byte."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** -9, (8 + m) * 2.0 ** (e.astype(np.float64) - 10))
    mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    return np.where(c & 0x80, -mag, mag)


E4M3_VALUES = _e4m3_table()


def encode_e4m3(v: np.ndarray) -> np.ndarray:
    """uint8 e4m3 codes of float values already scaled into [-448, 448] (round to nearest even);
    NaN, inf and anything larger become NaN, 0x7f (no sign: GPU arithmetic does not keep a NaN's)."""
    v = np.asarray(v, np.float64)
    sign = np.where(np.signbit(v), 0x80, 0).astype(np.uint8)
    a = np.abs(v)
    bad = ~(a <= E4M3_MAX)
    a = np.where(bad, 0.0, a)
    sub = a < 2.0 ** -6
    _, ex = np.frexp(np.where(sub, 1.0, a))
    e = ex - 1  # floor(log2 a) for the normal range, -6 .. 8
    q_norm = np.rint(a * np.ldexp(1.0, 3 - e))  # 8 .. 16 (16 carries into the exponent)
    code = np.where(sub, np.rint(a * 512.0), (e + 7) * 8 + q_norm - 8).astype(np.int64)
    code = np.where(bad, 0x7F, code | sign)
    return code.astype(np.uint8)


def tile_exponents(amax: np.ndarray) -> np.ndarray:
    """int k per tile: the smallest k with amax <= 448 * 2^k, clamped to [-126, 127]."""
    amax = np.asarray(amax, np.float64)
    f, ex = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = f * 2^ex, f in [0.5, 1)
    k = np.where(f <= 0.875, ex - 9, ex - 8)  # significand 2f <= 1.75: 448 * 2^(e - 8) covers it
    k = np.where(amax < 2.0 ** -126, -126, k)  # zero, or subnormal in float32
    return np.clip(k, -126, 127).astype(np.int64)


def ue8m0_values(b: np.ndarray) -> np.ndarray:
    """float64 2^(b - 127) of scale bytes; byte 255 is NaN."""
    b = np.asarray(b).astype(np.int64)
    return np.where(b == 255, np.nan, np.ldexp(1.0, b - 127))


def reference_pack_kv_fp8(kv) -> np.ndarray:
    """bf16 ``[P, 512]`` -> uint8 ``[P, 584]`` (the module docstring's layout)."""
    x = np.asarray(kv)
    P = x.shape[0]
    nope = x[:, :NOPE].astype(np.float64).reshape(P, TILES, TILE)
    finite = np.isfinite(nope)
    amax = np.where(finite, np.abs(nope), 0.0).max(axis=2) if P else np.zeros((0, TILES))
    k = tile_exponents(amax)
    scaled = np.where(finite, nope * np.ldexp(1.0, -k)[:, :, None], nope)
    out = np.zeros((P, FP8_ROW), np.uint8)
    out[:, :NOPE] = encode_e4m3(scaled).reshape(P, NOPE)
    out[:, ROPE_OFF:SCALE_OFF] = np.ascontiguousarray(x[:, NOPE:]).astype(BFLOAT16).view(np.uint8).reshape(P, 2 * ROPE)
    out[:, SCALE_OFF:SCALE_OFF + TILES] = (k + 127).astype(np.uint8)
    return out


def reference_unpack_kv_fp8(packed, dtype=np.float64) -> np.ndarray:
    """uint8 ``[P, 584]`` -> ``[P, 512]`` values (float64 by default: exact; ``dtype=BFLOAT16``
    rounds as the kernels do)."""
    b = np.asarray(packed)
    P = b.shape[0]
    vals = E4M3_VALUES[b[:, :NOPE]].reshape(P, TILES, TILE)
    scale = ue8m0_values(b[:, SCALE_OFF:SCALE_OFF + TILES])
    with np.errstate(invalid="ignore", over="ignore"):
        nope = (vals * scale[:, :, None]).reshape(P, NOPE)
    rope_bf16 = np.ascontiguousarray(b[:, ROPE_OFF:SCALE_OFF]).view(BFLOAT16)
    if np.dtype(dtype) == BFLOAT16:  # the rope bits travel unchanged (NaN payloads too)
        with np.errstate(over="ignore"):
            nope = nope.astype(np.float32).astype(BFLOAT16)  # float64 -> float32 is exact here
        return np.concatenate([nope, rope_bf16], axis=1)
    with np.errstate(invalid="ignore"):
        rope = rope_bf16.astype(np.float64)
    return np.concatenate([nope, rope], axis=1).astype(dtype)


# -- attention ------------------------------------------------------------------------------


def check_slots(indices, pool_rows: int) -> None:
    """The reference's check of slot numbers: -1 or 0 .. pool_rows - 1 (the GPU skips and counts)."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return
    bad = (idx < -1) | (idx >= pool_rows)
    if bad.any():
        n, j = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"indices must be -1 (no slot) or in [0, P={pool_rows}); found {int(idx[n, j])} at "
                         f"[{n}, {j}] ({int(bad.sum())} bad entries)")


def check_positions(positions, max_pos: int) -> None:
    p = np.asarray(positions)
    if p.size and (p.min() < 0 or p.max() >= max_pos):
        raise ValueError(f"positions must lie in [0, max_pos={max_pos}) (the rope tables' rows), found "
                         f"[{int(p.min())}, {int(p.max())}]")


def inverse_rope64(o: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Conjugate rotation of the last 64 dims (interleaved pairs) of ``o [..., 512]`` in place;
    ``cos``/``sin`` broadcast against ``o[..., 448::2]`` (float64)."""
    x0, x1 = o[..., NOPE::2].copy(), o[..., NOPE + 1::2].copy()
    o[..., NOPE::2] = x0 * cos + x1 * sin
    o[..., NOPE + 1::2] = -x0 * sin + x1 * cos
    return o


def reference_sparse_attention(q, kv, indices, sink, scale: float, kv_format: str = "bf16", positions=None,
                               rope_cos=None, rope_sin=None):
    """float64 ``(o [N, H, 512], lse [N, H])`` of sparse attention with a sink (see the op's
    docstring); slots must already be checked.  One query row at a time (no [N, H, K] array)."""
    q = np.asarray(q)
    N, H, _ = q.shape
    idx = np.asarray(indices)
    sink = np.asarray(sink, np.float64)
    o = np.zeros((N, H, DIM), np.float64)
    lse = np.full((N, H), -np.inf, np.float64)
    for n in range(N):
        slots = idx[n][idx[n] >= 0]
        if slots.size == 0:
            continue
        if kv_format == "fp8":
            rows = reference_unpack_kv_fp8(np.asarray(kv)[slots])
        else:
            rows = np.asarray(kv)[slots].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            s = q[n].astype(np.float64) @ rows.T * scale  # [H, k]
            m = s.max(axis=1)  # NaN in a head's q makes that head's m NaN
            e = np.exp(s - m[:, None])
            l = e.sum(axis=1)
            o[n] = (e @ rows) / (l + np.exp(sink - m))[:, None]
            lse[n] = m + np.log(l)
    if positions is not None:
        p = np.asarray(positions).astype(np.int64)
        inverse_rope64(o, np.asarray(rope_cos, np.float64)[p][:, None, :], np.asarray(rope_sin, np.float64)[p][:, None, :])
    return o, lse


def reference_variant(a) -> None:
    """The ``reference`` variant: fills ``a.out`` (bf16) and ``a.lse`` (float32) from float64."""
    o, lse = reference_sparse_attention(a.q, a.kv, a.indices, a.sink, a.scale, a.problem.kv_format, a.positions,
                                        a.rope_cos, a.rope_sin)
    a.out[...] = o.astype(np.float32).astype(BFLOAT16)
    if a.lse is not None:
        a.lse[...] = lse.astype(np.float32)
