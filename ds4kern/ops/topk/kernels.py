"""topk_rows' kernel sources (``cuda_src/topk/``), their instantiations, the chunk plan of the
radix variant and the device facts they need."""

from __future__ import annotations

from ...core import kernels
from ...core.launch import device_facts  # noqa: F401  (re-exported: ops call kernels.device_facts)

MAX_K = 2048          # the largest k (the bitonic sort of the winners holds up to 2048 in shared memory)
THREADS = 512         # radix and sort blocks
PER_THREAD = (8, 16, 32)  # keys each radix thread owns (in shared memory): chunks of 4096, 8192, 16384
SORT_MAX_COLS = 8192  # sort: the whole row as 64-bit keys in shared memory (64 KB)
DTYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}


def chunk_of(per: int) -> int:
    return per * THREADS


def radix_smem(per: int) -> int:
    """Dynamic shared memory of a radix block: the padded key staging (one word per 32 keys), the
    k winners as 64-bit keys (sorted in place), 256 histogram bins and a few scalars."""
    n = chunk_of(per)
    return (n + n // 32) * 4 + MAX_K * 8 + 256 * 4 + 64 * 4


def sort_smem(cols: int) -> int:
    n = 1 << max(0, (max(cols, 1) - 1).bit_length())
    return max(n, 64) * 8


def radix_plan(cols: int, k: int, per: int) -> list:
    """Chunks per row of each level: level 0 cuts the row into chunks of ``chunk_of(per)`` columns
    (at least 4 k, so each chunk keeps at most a quarter); each further level merges the k best of
    every chunk of the level before in chunks of the largest size, until one chunk remains.
    ``[S0, S1, ..., 1]``; ``[1]`` when the row fits one chunk."""
    big = chunk_of(max(PER_THREAD))
    first = chunk_of(per)
    if first < 4 * k:
        first = big
    levels = [max(1, -(-cols // first))]
    while levels[-1] > 1:
        levels.append(-(-(levels[-1] * k) // big))
    return levels


def level_per(level: int, cols: int, k: int, per: int) -> int:
    """Keys per thread of the blocks of one level of :func:`radix_plan`."""
    if level > 0 or chunk_of(per) < 4 * k:
        return max(PER_THREAD)
    return per


def scratch_bytes(rows: int, cols: int, k: int, per: int) -> int:
    """Device scratch of one radix call: two candidate buffers of (key, column) pairs."""
    levels = radix_plan(cols, k, per)
    if len(levels) == 1:
        return 0
    return rows * k * 8 * (levels[0] + (levels[1] if len(levels) > 2 else 0))




def rows_name(dtype: str, per: int, final: bool) -> str:
    return f"topk_radix_rows<{DTYPES[dtype]}, {per}, {'true' if final else 'false'}>"


def merge_name(final: bool) -> str:
    return f"topk_radix_merge<{max(PER_THREAD)}, {'true' if final else 'false'}>"


def sort_name(dtype: str) -> str:
    return f"topk_sort_rows<{DTYPES[dtype]}>"


# -- hist variant (cuda_src/topk/hist.cu) ---------------------------------------------------------
HIST_THREADS = 256        # DS4_TOPK_HIST_THREADS
HIST_PER = 16             # DS4_TOPK_HIST_PER: columns per thread
HIST_SLICE = HIST_THREADS * HIST_PER  # DS4_TOPK_HIST_SLICE: columns per block
HIST_BINS = 2048          # DS4_TOPK_HIST_BINS
HIST_STATE = 8            # DS4_TOPK_HIST_STATE: int32 words of row state
HIST_ROUNDS = 3           # digits of 11, 11 and 10 bits


def hist_slices(cols: int) -> int:
    return max(1, -(-cols // HIST_SLICE))


def hist_scratch_bytes(rows: int, cols: int, k: int) -> int:
    """Device scratch of one hist call: row state + histograms (zeroed), per-slice tie counts, and
    the candidates (k 64-bit words per row)."""
    return rows * (HIST_STATE + HIST_BINS) * 4 + rows * hist_slices(cols) * 4 + rows * k * 8


def hist_name(kind: str, dtype: str = "") -> str:
    return f"topk_hist_{kind}" if kind == "sort" else f"topk_hist_{kind}<{DTYPES[dtype]}>"


_F = kernels.KernelFamily
RADIX = kernels.register_family(_F("topk/radix.cu", tuple(
    rows_name(d, p, f) for d in DTYPES for p in PER_THREAD for f in (False, True))
    + tuple(merge_name(f) for f in (False, True))))
SORT = kernels.register_family(_F("topk/sort.cu", tuple(sort_name(d) for d in DTYPES)))
HIST = kernels.register_family(_F("topk/hist.cu", tuple(
    hist_name(kind, d) for kind in ("round", "ties", "collect") for d in DTYPES) + (hist_name("sort"),)))
FAMILIES = (RADIX, SORT, HIST)
