"""The KV compressor's kernel sources (``cuda_src/compressor/``) and their instantiations."""

from __future__ import annotations

from ...core import kernels
from ...core.kernels import C_TYPES

RATIOS = (4, 128)
POOL_GROUPS = (2, 4, 8)
GPU_DIMS = (128, 512)
# (kv / score dtype, cache dtype) pairs the kernels are instantiated for
IO = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float16"),
      ("float16", "float32"))
THREADS = 512  # threads of a ratio-128 block: D / 4 channel threads times the row groups


def pool_groups(ratio: int) -> tuple:
    """Settings of the grouped variant.  Ratio 128 stops at 4: eight rows' accumulators (96
    registers) plus their loads exceed the 128 registers a thread of the 512-thread block may
    use, and a smaller block would change the order in which the pool's partial sums merge, so
    the bits would differ from naive and prefill (which must agree exactly)."""
    return POOL_GROUPS if ratio == 4 else (2, 4)


def split(ratio: int, dim: int, group: int) -> int:
    """Row groups of a block: 1 for ratio 4 (8 rows); for ratio 128 as many as fill 512 threads,
    the same for every pool_group and for prefill (the merge order fixes the bits)."""
    return 1 if ratio == 4 else THREADS // (dim // 4)


def decode_name(tin, tout, ratio, dim, group):
    return (f"compress_decode<{C_TYPES[tin]}, {C_TYPES[tout]}, {ratio}, {dim}, {group}, "
            f"{split(ratio, dim, group)}>")


def emit_name(tin, tout, ratio, dim):
    return f"compress_prefill_emit<{C_TYPES[tin]}, {C_TYPES[tout]}, {ratio}, {dim}, {split(ratio, dim, 1)}>"


def state_name(tin, ratio, dim):
    return f"compress_prefill_state<{C_TYPES[tin]}, {ratio}, {dim}>"


_F = kernels.KernelFamily
DECODE = kernels.register_family(_F("compressor/decode.cu", tuple(
    decode_name(i, o, r, d, g) for i, o in IO for r in RATIOS for d in GPU_DIMS for g in (1,) + pool_groups(r))))
PREFILL = kernels.register_family(_F("compressor/prefill.cu", tuple(
    emit_name(i, o, r, d) for i, o in IO for r in RATIOS for d in GPU_DIMS)
    + tuple(state_name(i, r, d) for i in C_TYPES for r in RATIOS for d in GPU_DIMS)))
FAMILIES = (DECODE, PREFILL)
