"""indexer_topk's kernel sources (``cuda_src/indexer/``), their instantiations, the shared-memory
layout and grid plan of the tensor-core kernel, and the device facts they need."""

from __future__ import annotations

import functools

from ...core import kernels
from ...core.launch import device_facts  # noqa: F401  (re-exported: ops call kernels.device_facts)

HEADS = 64             # index heads (DS4_IX_HEADS)
DIM = 128              # index head dim (DS4_IX_DIM)
PAGE = 64              # rows of a key page (DS4_IX_PAGE)
TILE = 64              # key columns of an mma tile: one page (DS4_IX_TILE)
NAIVE_THREADS = 256    # naive: one thread per column (DS4_IX_NAIVE_THREADS)
MMA_WARPS = 4          # mma: warp w holds heads 16w .. 16w + 15 (DS4_IX_MMA_WARPS)
MMA_THREADS = 32 * MMA_WARPS
TOKEN_GROUPS = (1, 2)  # tokens per mma block (TG): 2 only where the tokens share their keys
ROW_SMEM = 272         # padded shared row of 128 bf16
WAVES = 2              # the mma grid aims at this many waves of resident blocks (provisional)
RESIDENT = {1: 4, 2: 3}  # mma blocks resident per SM (the kernels' __launch_bounds__ minimum)
NAIVE_SMEM = (HEADS * DIM + HEADS) * 4  # static: q[t] as float, w[t]


def mma_smem(tg: int, fp8: bool) -> int:
    """Dynamic shared memory of one mma block (IxLayout<TG, FP8>::BYTES in mma.cu): q of TG tokens,
    the key tile(s) (bf16: two stages; fp8: two raw stages, their scales and one bf16 tile), the
    cross-warp reduction buffer and the head weights."""
    tile = TILE * ROW_SMEM
    q = tg * HEADS * ROW_SMEM
    kt = (1 if fp8 else 2) * tile
    raw = 2 * TILE * DIM if fp8 else 0
    sc = 2 * TILE * 4 if fp8 else 0
    red = tg * MMA_WARPS * TILE * 4
    w = tg * HEADS * 4
    return q + kt + raw + sc + red + w


def tokens_per_block(tokens: int, shared_keys: bool) -> int:
    """TG of the mma kernel: 2 where two or more tokens read the same keys, else 1."""
    return 2 if shared_keys and tokens > 1 else 1


def mma_plan(tokens: int, cols: int, tg: int, sm_count: int) -> tuple:
    """``(run, runs, groups)`` of the mma grid: ``groups = ceil(T / TG)`` token groups, the C / 64
    key tiles of a row cut into ``runs`` runs of ``run`` tiles, with ``run`` the smallest that keeps
    the grid within about WAVES waves of resident blocks (``RESIDENT[TG] * sm_count`` a wave).
    Lengths are on the device, so the plan assumes full rows; blocks beyond a token's length exit
    at once."""
    tiles = -(-cols // TILE)
    groups = -(-tokens // tg)
    if tiles == 0 or groups == 0:
        return 0, 0, groups
    target = WAVES * RESIDENT[tg] * max(sm_count, 1)
    run = max(1, min(tiles, -(-(tiles * groups) // target)))
    return run, -(-tiles // run), groups


def naive_blocks(cols: int) -> int:
    """Column blocks of a naive row (256 columns each)."""
    return -(-cols // NAIVE_THREADS)


def logits_scratch_bytes(tokens: int, cols: int) -> int:
    """Device scratch of a call without ``return_logits``: the float32 ``[T, C]`` logits (the
    selection by topk_rows may add its own, see ``ds4kern.ops.topk.scratch_bytes``)."""
    return tokens * cols * 4


# -- device facts (cached per device) ------------------------------------------------------




@functools.lru_cache(maxsize=None)
def compute_capability(device_id: int) -> int:
    """10 * major + minor of a CUDA device (90 for an H100)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return 10 * int(props["major"]) + int(props["minor"])


# -- kernel families -----------------------------------------------------------------------


def _b(x: bool) -> str:
    return "true" if x else "false"


def naive_name(fp8: bool) -> str:
    return f"indexer_logits_naive<{_b(fp8)}>"


def mma_name(tg: int, fp8: bool) -> str:
    return f"indexer_logits_mma<{tg}, {_b(fp8)}>"


_F = kernels.KernelFamily
NAIVE = kernels.register_family(_F("indexer/naive.cu", tuple(naive_name(f) for f in (False, True))))
MMA = kernels.register_family(_F("indexer/mma.cu", tuple(mma_name(tg, f) for tg in TOKEN_GROUPS
                                                         for f in (False, True))))
FAMILIES = (NAIVE, MMA)
