"""Host-side planning of LocalityRecorder launches (no GPU): part sizes and the shared-memory
budgets they are chosen against."""

import pytest

from ds4kern.locality.recorder import (_GP, _MAX_BLOCKS, _MAX_KEYS, _PREP_STATIC, _accumulate_smem, _plan, _prepare_plan,
                              _prepare_smem)

H100_OPTIN = 227 * 1024


def adj_len(k):
    return 2 + (k + 1) * (2 * k + 1)


@pytest.mark.parametrize("E,W,k", [(256, 8, 6), (64, 2, 1), (200, 8, 8), (500, 16, 8), (512, 16, 32), (32, 1, 4)])
@pytest.mark.parametrize("T,layers", [(1, 1), (64, 1), (700, 2), (4096, 1), (4096, 43), (131072, 1), (1 << 20, 1)])
def test_plan_sizes(E, W, k, T, layers):
    part = _plan(E, k, T, layers, 132, H100_OPTIN)
    assert part >= 4 and part * k <= _MAX_KEYS
    nb = -(-(-(-T // part)) // _GP)  # blocks of 8 parts per layer
    assert nb <= _MAX_BLOCKS
    if part > 128:  # only as large as the walk back over blocks needs
        assert -(-(-(-T // (part // 2))) // _GP) > _MAX_BLOCKS
    assert _prepare_smem(E, k, part) + _PREP_STATIC <= H100_OPTIN
    assert _accumulate_smem(E, W, adj_len(k), part * k) <= H100_OPTIN


def test_plan_flash_step():
    """The benchmark's shape: 43 layers of 4096 tokens on 132 SMs give parts of 64 records (2752
    warps, ~21 per SM); one layer, or 64 tokens, give the smallest parts (4 records)."""
    assert _plan(256, 6, 4096, 43, 132, H100_OPTIN) == 64
    assert _plan(256, 6, 4096, 1, 132, H100_OPTIN) == 4
    assert _plan(256, 6, 64, 43, 132, H100_OPTIN) == 4


def test_plan_forced_and_refused():
    assert _plan(256, 6, 700, 2, 132, H100_OPTIN, part=3) == 3
    with pytest.raises(ValueError, match="record fewer records per call"):
        _plan(256, 6, 4096, 1, 132, 4 * 1024)
    with pytest.raises(ValueError, match="record fewer records per call"):
        _plan(256, 32, 1 << 24, 1, 132, H100_OPTIN)


def test_smem_grows_with_the_part():
    sizes = [_prepare_smem(256, 6, p) for p in (8, 64, 128, 512)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_prepare_batches_prefixes_and_stages_what_fits():
    """locality_prepare builds the 7 prefix bitmaps of a block at once while they fit (48 kB), in
    smaller batches beyond, and keeps its ids in shared memory up to 32 kB."""
    assert _prepare_plan(6, 64) == (7, True)  # the benchmark's parts: 3072 keys a block
    assert _prepare_plan(6, 512) == (7, False)
    nbp, stage = _prepare_plan(32, 1024)  # 262144 keys a block: one prefix at a time
    assert (nbp, stage) == (1, False)
