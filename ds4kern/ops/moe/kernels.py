"""moe_permute / moe_unpermute kernel sources (``cuda_src/moe/``), their instantiations and the
launch facts the variants and ``supports`` need."""

from __future__ import annotations

from ...core import kernels
from ...core.kernels import C_TYPES
from ...core.launch import device_facts  # noqa: F401  (re-exported: the api asks kernels.device_facts)

MAX_EXPERTS = 1024           # DS4_MOE_MAX_EXPERTS: the scan kernel's shared tables
SINGLE_THREADS = 512         # single_block: 16 warps
CHUNK_THREADS = 256          # chunked count / place blocks: 8 warps
SCAN_THREADS = 1024          # chunked scan block
SUB = 128                    # DS4_MOE_SUB: entries per warp range in the chunked kernels
CHUNK = (CHUNK_THREADS // 32) * SUB   # entries per chunked block
SCATTER_THREADS = 128        # DS4_MOE_SCATTER_THREADS
UNPERMUTE_THREADS = 128      # DS4_MOE_UNPERMUTE_THREADS
COPY_UNITS = {16: "uint4", 4: "unsigned int", 2: "unsigned short"}   # bytes -> C type of the copy unit
UNPERMUTE_VECS = (8, 1)      # channels per access: 8 (16-byte accesses), 1 (any layout)


SCAN_STATIC_SMEM = 32 * 4   # the block scan's warp sums (static shared memory beside the dynamic)


def single_block_smem(experts: int) -> int:
    """Dynamic shared memory of the single-block kernel: the [warps][E] table, the totals and
    their scan."""
    return ((SINGLE_THREADS // 32) * experts + 2 * experts + 1) * 4


def chunk_smem(experts: int) -> int:
    """Dynamic shared memory of a chunked count / place block: the [warps][E] table and the
    chunk's starting rows."""
    return ((CHUNK_THREADS // 32) * experts + experts) * 4


def chunks(entries: int) -> int:
    return max(1, -(-entries // CHUNK))


def single_block_name() -> str:
    return f"moe_permute_single_block<{SINGLE_THREADS}>"


def count_name() -> str:
    return f"moe_permute_count<{CHUNK_THREADS}>"


def scan_name() -> str:
    return f"moe_permute_scan<{SCAN_THREADS}>"


def place_name() -> str:
    return f"moe_permute_place<{CHUNK_THREADS}>"


def scatter_name(unit_bytes: int) -> str:
    return f"moe_scatter_rows<{COPY_UNITS[unit_bytes]}>"


def unpermute_name(y_dtype: str, out_dtype: str, vec: int) -> str:
    return f"moe_unpermute_rows<{C_TYPES[y_dtype]}, {C_TYPES[out_dtype]}, {vec}>"


_F = kernels.KernelFamily
PERMUTE = kernels.register_family(_F("moe/permute.cu", (single_block_name(), count_name(), scan_name(), place_name())))
SCATTER = kernels.register_family(_F("moe/scatter.cu", tuple(scatter_name(b) for b in COPY_UNITS)))
UNPERMUTE = kernels.register_family(_F("moe/unpermute.cu", tuple(
    unpermute_name(y, o, v) for y in C_TYPES for o in C_TYPES for v in UNPERMUTE_VECS)))
PERMUTE_FAMILIES = (PERMUTE, SCATTER)
UNPERMUTE_FAMILIES = (UNPERMUTE,)
