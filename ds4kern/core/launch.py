"""Small helpers every op's launchers share: null pointers for optional arguments, the opt-in to
more than 48 kB of dynamic shared memory, the grid-size check, and cached device facts."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["NULL", "MAX_GRID", "ptr", "allow_smem", "grid", "device_facts"]

NULL = np.uint64(0)
MAX_GRID = 2 ** 31 - 1
_smem_set: set = set()


def ptr(x):
    """An optional array argument: the array, or a null pointer."""
    return x if x is not None else NULL


def allow_smem(kern, nbytes: int) -> None:
    """Raise a kernel's dynamic shared-memory limit above the default 48 kB (once per kernel)."""
    if nbytes > 48 * 1024 and id(kern) not in _smem_set:
        kern.max_dynamic_shared_size_bytes = nbytes
        _smem_set.add(id(kern))


def grid(blocks: int, op: str, what: str, split: str) -> int:
    """``blocks`` if a 1-D grid can hold it, else ValueError naming the op and how to split."""
    if blocks > MAX_GRID:
        raise ValueError(f"{op}: {what} needs {blocks} blocks, beyond the grid limit {MAX_GRID}; split the call "
                         f"along {split}")
    return blocks


@functools.lru_cache(maxsize=None)
def device_facts(device_id: int) -> tuple:
    """``(opt-in shared memory per block in bytes, multiprocessor count)`` of a CUDA device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(props["sharedMemPerBlockOptin"]), int(props["multiProcessorCount"])
