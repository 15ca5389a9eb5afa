"""A numpy emulation of ``cuda_src/expert_mlp/grouped.cu``, thread by thread where layouts matter,
so that the index arithmetic of the tensor-core kernels is checked on a machine without a GPU.

What it mirrors from the kernel: the item search (per-thread chunks of experts, the block's
exclusive scan), the swizzled shared-memory stage (``em_swz``), the weight-row order of a block
tile (gate / up interleaved per warp), the per-lane 16-byte fragment loads and the register each
mma takes, and the epilogue (float tile with padded pitch, 8-element row chunks, rows beyond the
group skipped).  What it does *not* take from the kernel: the meaning of a register in
``mma.sync.m16n8k16.row.col`` -- :func:`mma` rebuilds the 16x16 A, 16x8 B and 16x8 D from the
lanes' registers with the fragment layout of the PTX ISA (independently written here), so a
mismatch between the kernel's fragment assumptions and the hardware layout shows up as a wrong
result.
"""

from __future__ import annotations

import numpy as np

from ds4kern.core.arrays import BFLOAT16
from ds4kern.ops.expert_mlp import kernels as K
from ds4kern.ops.expert_mlp.reference import swiglu

THREADS, TILE_ROWS, BK, STAGES, GU = K.THREADS, K.TILE_ROWS, K.BK, K.STAGES, K.GU_FEATURES
LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3


def bits(a) -> np.ndarray:
    """bf16 array -> its uint16 bit patterns."""
    return np.ascontiguousarray(a).view(np.uint16)


def bf16_of(u16) -> np.ndarray:
    """uint16 bit patterns -> float64 values."""
    return (np.asarray(u16, np.uint32) << 16).view(np.float32).astype(np.float64)


# -- the PTX fragment layout of mma.sync.aligned.m16n8k16.row.col (bf16 in, f32 accumulators) --------


def mma(d, a, b):
    """d (4 float arrays [32]) += A @ B for the lanes' registers a (4 uint32 arrays [32]) and b (2).

    A (16 x 16, row major): register i of lane (g, t) holds A[g + 8 (i & 1), 2t + 8 (i >> 1) + j] in
    half j (j = 0 low, 1 high).  B (16 x 8, "col"): register i holds B[2t + 8 i + j, g].  D: d0, d1 =
    D[g, 2t], D[g, 2t + 1]; d2, d3 = D[g + 8, 2t], D[g + 8, 2t + 1]."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for i in range(4):
        for j in range(2):
            A[G + 8 * (i & 1), 2 * T + 8 * (i >> 1) + j] = bf16_of((a[i] >> (16 * j)) & 0xFFFF)
    for i in range(2):
        for j in range(2):
            B[2 * T + 8 * i + j, G] = bf16_of((b[i] >> (16 * j)) & 0xFFFF)
    D = A @ B
    return [d[0] + D[G, 2 * T], d[1] + D[G, 2 * T + 1], d[2] + D[G + 8, 2 * T], d[3] + D[G + 8, 2 * T + 1]]


# -- the kernel, step by step -----------------------------------------------------------------------


def swz(row, chunk):
    """em_swz: byte offset of 16-byte chunk ``chunk`` of stage row ``row``."""
    row, chunk = np.asarray(row), np.asarray(chunk)
    return row * 128 + ((chunk ^ ((row & 1) << 2)) << 4)


def find_item(offsets, E, N, tiles, tn, w):
    """em_find_item: ``(e, tile, row0, rows)`` of item w, or None past the last item; also the total."""
    per = -(-E // THREADS)
    lo_n = []
    for e in range(E):
        a = min(max(int(offsets[e]), 0), N)
        b = min(max(int(offsets[e + 1]), 0), N)
        lo_n.append((a, max(b - a, 0)))
    mine = []
    for tid in range(THREADS):
        e0 = min(tid * per, E)
        e1 = min(e0 + per, E)
        mine.append(sum(tiles * (-(-n // tn)) for _, n in lo_n[e0:e1]))
    base = np.concatenate([[0], np.cumsum(mine)[:-1]])
    total = int(sum(mine))
    if w >= total:
        return None, total
    tid = int(np.flatnonzero((base <= w) & (w < base + np.array(mine)))[0])
    acc = int(base[tid])
    for e in range(min(tid * per, E), min(tid * per + per, E)):
        lo, n = lo_n[e]
        groups = -(-n // tn)
        cnt = tiles * groups
        if w < acc + cnt:
            r = w - acc
            g = r % groups
            return (e, r // groups, lo + g * tn, min(tn, n - g * tn)), total
        acc += cnt
    raise AssertionError("unreachable: the owner thread always finds the item")


def weight_rows(gate_up: bool):
    """em_weight_row: (matrix, feature offset within the tile) of each of the 64 tile rows."""
    r = np.arange(TILE_ROWS)
    if gate_up:
        return (r & 8) >> 3, (r >> 4) * 8 + (r & 7)
    return np.zeros_like(r), r


def issue_stage(W, f0, gate_up, X, row0, rows, tn, kc):
    """em_issue_stage: one stage's bytes.  W: the weight matrices of the expert as uint16 bits
    (gate_up: (w_gate[e], w_up[e]); down: (w_down[e],)); X: x or h bits [N, K]."""
    st = np.zeros((TILE_ROWS + tn) * 128, np.uint8)
    k0 = kc * BK
    mat, feat = weight_rows(gate_up)
    for r in range(TILE_ROWS):
        line = W[mat[r]][f0 + feat[r], k0:k0 + BK].view(np.uint8)  # 128 bytes = 8 chunks
        for ch in range(8):
            o = int(swz(r, ch))
            st[o:o + 16] = line[16 * ch:16 * ch + 16]
    xs = TILE_ROWS * 128
    for r in range(tn):
        if r >= rows:
            continue  # zero-filled
        line = X[row0 + r, k0:k0 + BK].view(np.uint8)
        for ch in range(8):
            o = xs + int(swz(r, ch))
            st[o:o + 16] = line[16 * ch:16 * ch + 16]
    return st


def load16(st, offsets):
    """Each lane's 16-byte shared load -> four uint32 arrays [32] (.x .y .z .w)."""
    words = np.stack([st[o:o + 16].view(np.uint32) for o in offsets])  # [32, 4]
    return [words[:, i].astype(np.uint64) for i in range(4)]


def compute_stage(acc, st, warp, tn):
    """em_compute_stage for one warp: acc[nt] = 4 float arrays [32]."""
    xs = TILE_ROWS * 128
    for half in range(2):
        ch = half * 4 + T
        lo = load16(st, swz(16 * warp + G, ch))
        hi = load16(st, swz(16 * warp + G + 8, ch))
        for nt in range(tn // 8):
            b = load16(st, xs + swz(nt * 8 + G, ch))
            acc[nt] = mma(acc[nt], (lo[0], hi[0], lo[1], hi[1]), (b[0], b[1]))
            acc[nt] = mma(acc[nt], (lo[2], hi[2], lo[3], hi[3]), (b[2], b[3]))
    return acc


def mainloop(W, f0, gate_up, X, row0, rows, tn, K_):
    accs = []
    stages = [issue_stage(W, f0, gate_up, X, row0, rows, tn, kc) for kc in range(K_ // BK)]
    for warp in range(4):
        acc = [[np.zeros(32) for _ in range(4)] for _ in range(tn // 8)]
        for st in stages:
            acc = compute_stage(acc, st, warp, tn)
        accs.append(acc)
    return accs  # [warp][nt][reg] -> float arrays [32]


def gate_up_block(x_bits, offsets, wg_bits, wu_bits, E, N, D, I, limit, h_bits, tn, w):
    item, total = find_item(offsets, E, N, I // GU, tn, w)
    if item is None:
        return total
    e, tile, row0, rows = item
    f0 = tile * GU
    accs = mainloop((wg_bits[e], wu_bits[e]), f0, True, x_bits, row0, rows, tn, D)
    pitch = GU + 4
    stage = np.zeros(tn * pitch, np.float32)
    for warp in range(4):
        f = 8 * warp + G
        for nt in range(tn // 8):
            a = accs[warp][nt]
            n = nt * 8 + 2 * T
            stage[n * pitch + f] = swiglu(a[0].astype(np.float32), a[2].astype(np.float32), limit)
            stage[(n + 1) * pitch + f] = swiglu(a[1].astype(np.float32), a[3].astype(np.float32), limit)
    for c in range(tn * (GU // 8)):
        n, q = c >> 2, c & 3
        if n < rows:
            h_bits[row0 + n, f0 + q * 8:f0 + q * 8 + 8] = bits(stage[n * pitch + q * 8:n * pitch + q * 8 + 8]
                                                                .astype(BFLOAT16))
    return total


def down_block(h_bits, offsets, wd_bits, E, N, D, I, out, tn, w):
    item, total = find_item(offsets, E, N, D // TILE_ROWS, tn, w)
    if item is None:
        return total
    e, tile, row0, rows = item
    f0 = tile * TILE_ROWS
    accs = mainloop((wd_bits[e],), f0, False, h_bits, row0, rows, tn, I)
    pitch = TILE_ROWS + 4
    stage = np.zeros(tn * pitch, np.float32)
    for warp in range(4):
        f = 16 * warp + G
        for nt in range(tn // 8):
            a = accs[warp][nt]
            n = nt * 8 + 2 * T
            stage[n * pitch + f] = a[0]
            stage[(n + 1) * pitch + f] = a[1]
            stage[n * pitch + f + 8] = a[2]
            stage[(n + 1) * pitch + f + 8] = a[3]
    for c in range(tn * (TILE_ROWS // 8)):
        n, q = c >> 3, c & 7
        if n < rows:
            out[row0 + n, f0 + q * 8:f0 + q * 8 + 8] = stage[n * pitch + q * 8:n * pitch + q * 8 + 8].astype(out.dtype)
    return total


def grouped(x, offsets, w_gate, w_up, w_down, limit, out, tn):
    """Both launches over their whole grids (sizes from ``kernels.item_bound``, as the launcher);
    returns ``out``.  Asserts that the grid covers every item (true for valid offsets)."""
    N, D = x.shape
    E, I = w_gate.shape[:2]
    xb, wgb, wub, wdb = bits(x), bits(w_gate), bits(w_up), bits(w_down)
    h = np.full((N, I), 0x7FC0, np.uint16)  # NaN: a row the first launch forgot would show
    b1 = K.item_bound(N, E, tn, K.gate_up_tiles(I))
    b2 = K.item_bound(N, E, tn, K.down_tiles(D))
    total = 0
    for w in range(b1):
        total = gate_up_block(xb, offsets, wgb, wub, E, N, D, I, limit, h, tn, w)
    assert total <= b1, f"gate_up: {total} items, grid {b1}"
    for w in range(b2):
        total = down_block(h, offsets, wdb, E, N, D, I, out, tn, w)
    assert total <= b2, f"down: {total} items, grid {b2}"
    return out
