"""router_topk's kernel sources (``cuda_src/router/``), their instantiations and launch shapes.

Constants that mirror a CUDA ``#define`` say which; ``tests/router/test_kernels.py`` checks each
against the source.
"""

from __future__ import annotations

from ...core import kernels
from ...core.env import env_int
from ...core.kernels import C_TYPES

# naive: one warp per token, k rounds of warp arg-max.  Values per lane the kernel is instantiated
# for (registers hold 32*VPL keys per warp).
NAIVE_VPL = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96)
NAIVE_MAX_E = 32 * NAIVE_VPL[-1]
NAIVE_WARPS_PER_BLOCK = 4


def naive_name(dtype: str, vpl: int) -> str:
    return f"router_topk_naive<{C_TYPES[dtype]}, {vpl}>"


# threshold: lane-max threshold, candidates compacted one per lane (E <= 32 * 32)
THRESHOLD_VPL = (1, 2, 4, 8, 16, 32)
THRESHOLD_MAX_E = 32 * THRESHOLD_VPL[-1]


def threshold_name(dtype: str, vpl: int) -> str:
    return f"router_topk_threshold<{C_TYPES[dtype]}, {vpl}>"


# radix: keys in shared memory, radix select of the k-th key
RADIX_MAX_SMEM = 48 * 1024  # dynamic shared memory without an opt-in


def radix_smem(E: int, k: int) -> int:
    return 4 * (E + 256 + 2 * k)


def radix_name(dtype: str) -> str:
    return f"router_topk_radix<{C_TYPES[dtype]}>"


# warp kernels (screened / grouped): contiguous lanes, compile-time score function
WARP_VPL = (1, 2, 4, 8, 16)
WARP_MAX_E = 32 * WARP_VPL[-1]
WARP_MAX_K = 32  # one candidate per lane
WARP_THREADS = 256  # DS4_WARP_THREADS
# blocks per SM in the grid (the rest of the tokens by grid stride); env override for sweeps
WARP_BLOCKS_PER_SM = env_int("DS4KERN_ROUTER_WARP_BLOCKS_PER_SM", 4, minimum=1)
# Up to this many tokens, kernels on exact keys (grouped, softmax) skip the screening threshold and
# run k exact rounds over all keys: fewer dependent warp reductions per token.  From
# bench/router/PERFORMANCE.md (H100, V3 style): T=1 4.95 -> 4.51 us, T=128 5.43 -> 5.19, T=1024
# 5.56 -> 5.35, but T=4096 9.97 -> 11.3 and T=65536 102 -> 128 us.  Env override for sweeps.
WARP_DIRECT_MAX_TOKENS = env_int("DS4KERN_ROUTER_WARP_DIRECT_MAX_TOKENS", 1024, minimum=0)
WARP_SF = {("softmax", False): 0, ("sigmoid", False): 1, ("sqrtsoftplus", False): 2, ("softmax", True): 3}


def warp_name(dtype: str, sf: int, grouped: bool, vpl: int) -> str:
    return f"router_topk_warp<{C_TYPES[dtype]}, {sf}, {'true' if grouped else 'false'}, {vpl}>"


def warp_vpl(E: int) -> int:
    return next(v for v in WARP_VPL if 32 * v >= E)


def group_lanes(E: int, num_groups: int):
    """Lanes per group in the grouped warp kernel, or None where groups do not fall on whole lanes."""
    vpl = warp_vpl(E)
    gs = E // num_groups
    if gs % vpl:
        return None
    lpg = gs // vpl
    return lpg if lpg & (lpg - 1) == 0 else None


# rows: one or two lanes per token, rows read in 16-byte loads
ROWS_KMAX = (8, 16)
ROWS_MAX_E = 256
ROWS_WARPS = 2  # DS4_ROWS_WARPS
ROWS_SF = {"sigmoid": 1, "sqrtsoftplus": 2}
ROWS_LPT = (1, 2)  # lanes per token (2: each lane takes half the row; needs E % 16 == 0)
ROWS_LPT_SETTING = env_int("DS4KERN_ROUTER_ROWS_LPT", 2, choices=ROWS_LPT)
ROWS_GROUPED_MAX_M = 2  # group score = sum of the top k / group_topk <= 2 (two registers per lane)


def rows_name(dtype: str, sf: int, kmax: int, lpt: int = 1) -> str:
    return f"router_topk_rows<{C_TYPES[dtype]}, {sf}, {kmax}, {lpt}>"


def rows_lanes(E: int, kmax: int) -> int:
    """Lanes per token the rows kernel uses (2 only with the 8-entry list: registers)."""
    return 2 if ROWS_LPT_SETTING == 2 and E % 16 == 0 and kmax == 8 else 1


def rows_grouped_name(dtype: str, sf: int) -> str:
    return f"router_topk_rows_grouped<{C_TYPES[dtype]}, {sf}>"


def rows_smem(kmax: int, warps: int = ROWS_WARPS, grouped: bool = False) -> int:
    """Dynamic shared memory of one block of ``warps`` warps (DS4_ROWS_WARPS): candidate lists
    (logit and expert; grouped: 8 more rows, the group sums and m-th scores share them), bias
    table, max |bias|."""
    return warps * (kmax + (24 if grouped else 16)) * 32 * 5 + (256 + 4) * 4


# diagnostic kernels of the screens' error bounds (tests/router/test_screen_bounds_gpu.py)
SSP_PROBE = "router_ssp_approx_probe<0>"
SCREEN_PROBES = {"sigmoid": "router_screen_probe<1>", "sqrtsoftplus": "router_screen_probe<2>"}

_F = kernels.KernelFamily
NAIVE = kernels.register_family(_F("router/naive.cu", tuple(
    naive_name(d, v) for d in C_TYPES for v in NAIVE_VPL)))
THRESHOLD = kernels.register_family(_F("router/threshold.cu", tuple(
    threshold_name(d, v) for d in C_TYPES for v in THRESHOLD_VPL)))
RADIX = kernels.register_family(_F("router/radix.cu", tuple(radix_name(d) for d in C_TYPES)))
WARP = kernels.register_family(_F("router/warp.cu", tuple(
    warp_name(d, sf, g, v) for d in C_TYPES for sf in sorted(set(WARP_SF.values()))
    for g in (False, True) for v in WARP_VPL)))
ROWS = kernels.register_family(_F("router/rows.cu", tuple(
    rows_name(d, sf, km, lp) for d in C_TYPES for sf in sorted(ROWS_SF.values()) for km in ROWS_KMAX
    for lp in ROWS_LPT if lp == 1 or km == 8)))
ROWS_GROUPED = kernels.register_family(_F("router/rows_grouped.cu", tuple(
    rows_grouped_name(d, sf) for d in C_TYPES for sf in sorted(ROWS_SF.values()))))
PROBES = kernels.register_family(_F("router/screen_probe.cu", (SSP_PROBE,) + tuple(SCREEN_PROBES.values())))

FAMILIES = (NAIVE, THRESHOLD, RADIX, WARP, ROWS, ROWS_GROUPED)
