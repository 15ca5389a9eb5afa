"""Host-side planning of LocalityRecorder launches (no GPU): sub-segment and part sizes, and the
shared-memory budgets they are chosen against."""

import pytest

from ds4kern.recorder import _MAX_PARTS, _accumulate_smem, _plan, _prepare_smem

H100_OPTIN = 227 * 1024


def adj_len(k):
    return 2 + (k + 1) * (2 * k + 1)


@pytest.mark.parametrize("E,W,k", [(256, 8, 6), (64, 2, 1), (200, 8, 8), (500, 16, 8), (512, 16, 32), (32, 1, 4)])
@pytest.mark.parametrize("T,layers", [(1, 1), (64, 1), (700, 2), (4096, 1), (4096, 43), (131072, 1), (1 << 20, 1)])
def test_plan_sizes(E, W, k, T, layers):
    rb, part = _plan(E, W, k, adj_len(k), T, layers, 132, H100_OPTIN)
    assert rb in (32, 64, 128) and part % rb == 0 and part >= rb
    assert -(-T // part) <= _MAX_PARTS
    if rb > 32:  # the largest sub-segment that fits three blocks per SM
        assert _accumulate_smem(E, W, k, adj_len(k), rb) <= 74 * 1024
    bigger = {32: 64, 64: 128}.get(rb)
    if bigger:
        assert _accumulate_smem(E, W, k, adj_len(k), bigger) > 74 * 1024
    assert _prepare_smem(E, W, k, part) <= H100_OPTIN


def test_plan_flash_step():
    """The benchmark's shape: 43 layers of 4096 tokens on 132 SMs give parts of 512 records (344
    blocks, about three per SM) in sub-segments of 128 (bench/NOTES.md: the fastest measured)."""
    assert _plan(256, 8, 6, adj_len(6), 4096, 43, 132, H100_OPTIN) == (128, 512)
    assert _plan(256, 8, 6, adj_len(6), 4096, 1, 132, H100_OPTIN) == (128, 128)


def test_plan_forced_and_refused():
    assert _plan(256, 8, 6, adj_len(6), 700, 2, 132, H100_OPTIN, rb=32, part=96) == (32, 96)
    with pytest.raises(ValueError, match="record fewer records per call"):
        _plan(256, 8, 6, adj_len(6), 4096, 1, 132, 4 * 1024)


def test_smem_grows_with_the_sub_segment():
    sizes = [_accumulate_smem(256, 8, 6, adj_len(6), rb) for rb in (32, 64, 128, 256)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
