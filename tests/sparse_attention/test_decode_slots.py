"""decode_slots: the decode step's slot indices (window ring, CSA indexer columns, HCA visible rows)
against a direct construction, validation, and the GPU kernel against the reference."""

import numpy as np
import pytest

from ds4kern.ops.sparse_attention import decode_slots, reference_decode_slots


def direct(pos, W, base, rows, ratio, selected, width):
    out = []
    for b, p in enumerate(pos):
        row = [base + b * W + (q % W) if q >= 0 else -1 for q in range(p - W + 1, p + 1)]
        if selected is not None:
            row += [s + b * rows if s >= 0 else -1 for s in selected[b]]
        elif ratio and width:
            row += [b * rows + c if c < (p + 1) // ratio else -1 for c in range(width)]
        out.append(row)
    return np.array(out, np.int32).reshape(len(pos), -1)


CASES = [  # (positions, W, ratio, k or width)
    ([0, 5, 127, 128, 300], 128, 0, 0),
    ([3, 140, 511], 128, 4, 16),          # CSA: k selected columns
    ([3, 140, 1000], 128, 128, 8),        # HCA: width columns
    ([0], 8, 4, 3),
]


@pytest.mark.parametrize("pos,W,ratio,c", CASES)
def test_reference_matches_direct(pos, W, ratio, c):
    rng = np.random.default_rng(len(pos))
    B, rows = len(pos), 4096
    base = B * rows
    sel = None
    if ratio == 4:
        sel = rng.integers(-1, 200, (B, c)).astype(np.int32)
    width = c if ratio == 128 else 0
    got = decode_slots(np.array(pos), window=W, ring_base=base, rows=rows, ratio=ratio, selected=sel, width=width)
    np.testing.assert_array_equal(got, direct(pos, W, base, rows, ratio, sel, width))
    assert got.dtype == np.int32


def test_validation():
    with pytest.raises(ValueError, match=r"positions must be integers of shape \[B\]"):
        decode_slots(np.zeros((2, 2), np.int64), window=8, ring_base=0, rows=4)
    with pytest.raises(ValueError, match=r"selected must be int32 \[B = 2, k\]"):
        decode_slots(np.zeros(2, np.int64), window=8, ring_base=0, rows=4, selected=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="window"):
        decode_slots(np.zeros(2, np.int64), window=0, ring_base=0, rows=4)


@pytest.mark.gpu
@pytest.mark.parametrize("pos,W,ratio,c", CASES + [(list(range(0, 256 * 4000, 4000)), 128, 128, 8000)])
def test_gpu_matches_reference(pos, W, ratio, c):
    import cupy as cp
    rng = np.random.default_rng(7)
    B, rows = len(pos), 8192
    sel = rng.integers(-1, 8000, (B, c)).astype(np.int32) if ratio == 4 else None
    width = c if ratio == 128 else 0
    want = reference_decode_slots(np.array(pos), W, B * rows, rows, ratio, sel, width)
    got = decode_slots(cp.asarray(np.array(pos)), window=W, ring_base=B * rows, rows=rows, ratio=ratio,
                       selected=None if sel is None else cp.asarray(sel), width=width)
    np.testing.assert_array_equal(cp.asnumpy(got), want)
