"""expert_mlp's variants (launchers, what each supports) and their registration.

``grouped`` means rows grouped by expert (the kernels take each expert's rows in groups of TN),
as ``moe_permute`` lays them out; the compressor's and hyper-connections' ``grouped`` group batch
rows / tokens into one block in the same sense of several rows sharing one weight load.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...core.hookspecs import hookimpl
from ...core.launch import MAX_GRID, allow_smem as _allow_smem
from ...core.launch import grid as _core_grid
from ...core.registry import Variant
from . import kernels as K
from .api import OP, ExpertMlpArgs, ExpertMlpProblem
from .reference import reference_variant

GROUPED_MIN_CC = 80  # mma.sync bf16, cp.async


def _grid(blocks: int, what: str) -> int:
    return _core_grid(blocks, OP, what, "N (the rows)")


def _elementwise_blocks(n: int) -> int:
    return max(1, min(-(-n // K.NAIVE_THREADS), 8192))


# -- naive ------------------------------------------------------------------------------------


def _widen(xp, a):
    """A bf16 matrix view (any strides) as a contiguous float32 copy (exact)."""
    rows, cols = (int(d) for d in a.shape)
    dst = xp.empty((rows, cols), np.float32)
    if dst.size:
        kern = K.NAIVE.kernel(K.WIDEN_NAME)
        kern((_elementwise_blocks(dst.size),), (K.NAIVE_THREADS,),
             (a, np.int64(a.strides[0] // a.itemsize), np.int64(a.strides[1] // a.itemsize), np.int64(rows),
              np.int64(cols), dst))
    return dst


def _naive(a: ExpertMlpArgs) -> None:
    """Per touched expert: three float32 GEMMs (cuBLAS through CuPy) of the widened bf16 operands,
    the SwiGLU (rounded to bf16) and the store between them.  Copies offsets to the host: it
    synchronises with the device."""
    xp = a.frame.xp
    N = a.rows
    offs = np.clip(xp.asnumpy(a.offsets).astype(np.int64), 0, N)  # the grouped kernels' clamping
    swiglu = K.NAIVE.kernel(K.SWIGLU_NAME)
    store = K.NAIVE.kernel(K.store_name(a.problem.out_dtype))
    for e in range(a.experts):
        lo, hi = int(offs[e]), int(offs[e + 1])
        if hi <= lo:
            continue
        xe = _widen(xp, a.x[lo:hi])
        g = xe @ _widen(xp, a.w_gate[e]).T
        u = xe @ _widen(xp, a.w_up[e]).T
        swiglu((_elementwise_blocks(g.size),), (K.NAIVE_THREADS,), (g, u, np.int64(g.size), np.float32(a.limit)))
        y = xp.ascontiguousarray(g @ _widen(xp, a.w_down[e]).T)
        store((_elementwise_blocks(y.size),), (K.NAIVE_THREADS,), (y, np.int64(y.size), a.out[lo:hi]))


# -- grouped ----------------------------------------------------------------------------------


def _grid_blocks(p: ExpertMlpProblem, tn: int, rows: int) -> tuple:
    """Blocks of the gate_up and down launches for ``rows`` rows."""
    return (K.item_bound(rows, p.experts, tn, K.gate_up_tiles(p.inter)),
            K.item_bound(rows, p.experts, tn, K.down_tiles(p.dim)))


def _grouped_configs(p: ExpertMlpProblem) -> list:
    """Rows per group whose block fits the device and whose grid fits a launch, the static default
    (:func:`kernels.default_tokens_per_group`) first."""
    fits = [t for t in K.TOKEN_GROUPS
            if K.grouped_block_smem(t) <= p.smem_per_block and max(_grid_blocks(p, t, p.rows_bucket)) <= MAX_GRID]
    if not fits:
        return []
    first = K.default_tokens_per_group(p.rows_bucket, p.experts, p.dim, p.inter, p.sm_count)
    if first not in fits:
        first = fits[0]
    return [{"tokens_per_group": first}] + [{"tokens_per_group": t} for t in fits if t != first]


def _grouped_supports(p: ExpertMlpProblem) -> Optional[str]:
    if p.cc and p.cc < GROUPED_MIN_CC:
        return f"needs sm_80 or newer (mma.sync bf16, cp.async); the device is sm_{p.cc}"
    if p.dim % K.ALIGN or p.inter % K.ALIGN:
        return (f"D={p.dim} and I={p.inter} must be multiples of {K.ALIGN} (a pipeline stage reads 64 columns "
                "of each weight row)")
    if p.experts > K.MAX_EXPERTS:
        return f"E={p.experts} experts: the item search handles at most {K.MAX_EXPERTS}"
    if not p.weights_contiguous:
        return "w_gate, w_up and w_down must be C-contiguous (the kernels address whole rows from the base)"
    if not p.aligned16:
        return "x, the weights and out must start on 16-byte boundaries (16-byte copies and stores)"
    if not _grouped_configs(p):
        need = K.grouped_block_smem(K.TOKEN_GROUPS[0])
        if need > p.smem_per_block:
            return f"a block needs {need} bytes of shared memory; the device offers {p.smem_per_block}"
        return f"N<={p.rows_bucket} rows need more blocks than one launch holds; split the call along N"
    return None


def _grouped(a: ExpertMlpArgs, tokens_per_group: int = K.TOKEN_GROUPS[0]) -> None:
    """Two launches, no host synchronisation: gate_up (SwiGLU fused) into a bf16 ``[N, I]``
    scratch, then down into out."""
    tn = tokens_per_group
    if tn not in K.TOKEN_GROUPS:
        raise ValueError(f"tokens_per_group must be one of {K.TOKEN_GROUPS}, got {tn!r}")
    p = a.problem
    N, E, D, I = a.rows, a.experts, a.dim, a.inter
    if N == 0:
        return
    b1, b2 = _grid_blocks(p, tn, N)
    h = a.frame.xp.empty((N, I), np.uint16)  # bf16 bits: only the kernels read and write it
    smem = K.grouped_smem(tn)
    sizes = (np.int32(E), np.int32(N), np.int32(D), np.int32(I))
    k1 = K.GROUPED.kernel(K.gate_up_name(tn))
    _allow_smem(k1, K.grouped_block_smem(tn))
    k1((_grid(b1, f"gate_up ({K.gate_up_tiles(I)} tiles x row groups)"),), (K.THREADS,),
       (a.x, a.offsets, a.w_gate, a.w_up) + sizes + (np.float32(a.limit), h), shared_mem=smem)
    k2 = K.GROUPED.kernel(K.down_name(tn, p.out_dtype == "float32"))
    _allow_smem(k2, K.grouped_block_smem(tn))
    k2((_grid(b2, f"down ({K.down_tiles(D)} tiles x row groups)"),), (K.THREADS,),
       (h, a.offsets, a.w_down) + sizes + (a.out,), shared_mem=smem)


@hookimpl
def ds4kern_register_variants(register):
    register(Variant(OP, "reference", "numpy", reference_variant,
                     description="numpy, float32 arithmetic per expert (h rounded to bf16); checks offsets"))
    register(Variant(OP, "naive", "cuda", _naive,
                     description="per touched expert three float32 cuBLAS GEMMs (CuPy) of the widened bf16 operands, "
                                 "SwiGLU and stores in small kernels; copies offsets to the host (synchronises)"))
    register(Variant(OP, "grouped", "cuda", _grouped, supports=_grouped_supports, configs=_grouped_configs,
                     description="tensor cores (mma.sync bf16, weights as M, rows as N), a block per (expert, 32 or "
                                 "64 output features, group of tokens_per_group rows); gate+up with the SwiGLU fused "
                                 "into a bf16 scratch, then down: two launches, no host synchronisation"))
