"""The hyper-connection kernel sources (``cuda_src/hyper_connections/``), their instantiations,
the launch shapes of the variants, split's plan and its per-stream workspace."""

from __future__ import annotations

import functools
import threading

from ...core import kernels
from ...core.kernels import C_TYPES

X_DTYPES = ("float32", "bfloat16")   # streams X (and X_new)
Y_DTYPES = ("float32", "bfloat16")   # sub-block output y
VECS = (4, 1)                        # channels per access: 4 (aligned), 1 (anything)
POST_THREADS = 128                   # DS4_HC_POST_THREADS
SLOT = 32                            # DS4_HC_SLOT: reduced values per token
# (tokens per block, threads per block) of the pre / post_pre kernels: naive (1, 256); grouped
# (2 or 4, 128); split (1, 2 or 4, 128)
NAIVE_LAUNCH = (1, 256)
GROUPED_TOKENS = (4, 2)              # grouped's settings, the default first
BLOCK_THREADS = 128                  # grouped and split
LAUNCHES = (NAIVE_LAUNCH,) + tuple((t, BLOCK_THREADS) for t in (1, 2, 4))
SPLIT_SLICE_CHUNKS = 64              # fewest chunks (of `vec` channels, four streams) per split block (default)
SPLIT_SLICE_CHOICES = (64, 16)       # split's slice_chunks settings, the default first (16: 4x the blocks at small B)


def pre_name(dtype: str, vec: int, tok: int, threads: int) -> str:
    return f"hc_pre<{C_TYPES[dtype]}, {vec}, {tok}, {threads}>"


def post_pre_name(dtype: str, y_dtype: str, vec: int, tok: int, threads: int) -> str:
    return f"hc_post_pre<{C_TYPES[dtype]}, {C_TYPES[y_dtype]}, {vec}, {tok}, {threads}>"


def post_name(dtype: str, y_dtype: str, vec: int) -> str:
    return f"hc_post<{C_TYPES[dtype]}, {C_TYPES[y_dtype]}, {vec}>"


# tiled hc_pre (cuda_src/hyper_connections/pre_tiled.cu): tokens per block of the dots launch, channels per chunk
TILE_TOKENS = 256         # DS4_HC_TILE_TOKENS
TILE_CH = 32              # DS4_HC_TILE_CH
TILE_THREADS = 256        # DS4_HC_TILE_THREADS
TILE_MIN_CHUNKS = 4       # fewest chunks of TILE_CH channels per slice
TILE_PARTIAL_SHARE = 0.25  # partial sums at most this share of X's bytes (caps the slices)


def tiled_dots_name(dtype: str) -> str:
    return f"hc_pre_tiled_dots<{C_TYPES[dtype]}>"


def tiled_finish_name(dtype: str) -> str:
    return f"hc_pre_tiled_finish<{C_TYPES[dtype]}, 4>"


def tiled_slices(tokens: int, dim: int, itemsize: int, sm_count: int) -> int:
    """Slices of the 4D channels per token tile: at most two blocks per multiprocessor (the dots
    kernel's registers allow two resident blocks, so tiles x slices stays within one wave: ncu at
    B=4096, D=7168 on an H100 showed 16 x 17 = 272 blocks, one full wave of 264 and a tail of 8,
    which ncu bounds at up to half the kernel's time; the floor took hc_pre there from 598.7 to
    437.6 us), each slice at least TILE_MIN_CHUNKS chunks, and the partial sums (128 bytes per
    token and slice) at most TILE_PARTIAL_SHARE of X's bytes (4 D itemsize per token).  Never fewer
    than one slice: at D = 32 (bf16) that one slice's partials are half of X's bytes, and from 133
    tiles (B > 34k tokens) one slice per tile leaves about one block per SM (not measured)."""
    tiles = max(1, -(-tokens // TILE_TOKENS))
    chunks = 4 * dim // TILE_CH
    want = 2 * sm_count // tiles  # floor: never a partial second wave
    cap = min(chunks // TILE_MIN_CHUNKS, int(4 * dim * itemsize * TILE_PARTIAL_SHARE) // (SLOT * 4))
    return max(1, min(want, cap))


_F = kernels.KernelFamily
PRE = kernels.register_family(_F("hyper_connections/pre.cu", tuple(
    pre_name(x, v, t, n) for x in X_DTYPES for v in VECS for t, n in LAUNCHES)))
POST_PRE = kernels.register_family(_F("hyper_connections/post_pre.cu", tuple(
    post_pre_name(x, y, v, t, n) for x in X_DTYPES for y in Y_DTYPES for v in VECS for t, n in LAUNCHES)))
POST = kernels.register_family(_F("hyper_connections/post.cu", tuple(
    post_name(x, y, v) for x in X_DTYPES for y in Y_DTYPES for v in VECS)))
PRE_TILED = kernels.register_family(_F("hyper_connections/pre_tiled.cu", tuple(
    f(x) for x in X_DTYPES for f in (tiled_dots_name, tiled_finish_name))))
FAMILIES = (PRE, POST_PRE, POST, PRE_TILED)


def split_tokens(tokens: int) -> int:
    """Tokens per block of the split variant: each hc_fn element a block loads serves them all,
    so grouping cuts hc_fn's L2 traffic (96 D bytes per block) as B grows; small B keeps one token
    per block for parallelism.  Provisional until measured on the device."""
    return 1 if tokens < 8 else (2 if tokens < 32 else 4)


def split_plan(tokens: int, dim: int, vec: int, sm_count: int, slice_chunks: int = SPLIT_SLICE_CHUNKS) -> tuple:
    """``(tokens per block, slices)`` of a split call: about two blocks per multiprocessor, each
    slice at least ``slice_chunks`` chunks of ``vec`` channels."""
    tok = split_tokens(tokens)
    groups = -(-tokens // tok)
    most = max(1, (dim // vec) // slice_chunks)
    want = -(-2 * sm_count // max(1, groups))
    return tok, max(1, min(most, want))


def split_max_slices(dim: int, vec: int, slice_chunks: int = SPLIT_SLICE_CHUNKS) -> int:
    return (dim // vec) // slice_chunks


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


# -- split's workspace ---------------------------------------------------------------------
# One (counters, partial sums) pair per (device, stream).  The kernels leave every counter at
# zero, so a buffer is zeroed once, when it is made.  Buffers are only ever replaced by larger
# ones and the old ones are kept: a captured CUDA graph may still point at them.  A buffer made
# while its stream is being captured is zeroed only by the captured memset (when the graph
# runs), so it serves that capture alone and is never handed to a later call.

_ws_lock = threading.Lock()
_workspaces: dict = {}
_retired: list = []


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _capturing(stream) -> bool:
    try:
        return bool(stream.is_capturing())
    except Exception:
        return False


def workspace(frame, groups: int, floats: int) -> tuple:
    """``(counters int32 [>= groups], partials float32 [>= floats])`` for the current stream."""
    cp = frame.cp
    stream = cp.cuda.get_current_stream()
    key = (frame.device_id, stream.ptr)
    with _ws_lock:
        w = _workspaces.get(key)
        if w is not None and w[0].size >= groups and w[1].size >= floats:
            return w
        n_c = _pow2(max(groups, 256, 0 if w is None else w[0].size))
        n_p = _pow2(max(floats, 1 << 15, 0 if w is None else w[1].size))
        new = (cp.zeros(n_c, dtype="int32"), cp.empty(n_p, dtype="float32"))
        if _capturing(stream):
            _retired.append(new)
            return new
        if w is not None:
            _retired.append(w)
        _workspaces[key] = new
        return new
