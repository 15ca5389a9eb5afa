"""The KV compressor (CSA ratio 4, HCA ratio 128): compress_decode and compress_prefill."""

from ...core.registry import add_builtin
from . import variants
from .api import (DECODE_OP, PREFILL_OP, CompressArgs, CompressProblem, coff_of, compress_decode, compress_prefill,
                  init_state, state_shape)
from .kernels import POOL_GROUPS, RATIOS, pool_groups
from .reference import reference_decode_step

add_builtin(variants)

__all__ = ["compress_decode", "compress_prefill", "init_state", "state_shape", "coff_of", "pool_groups",
           "reference_decode_step", "CompressArgs", "CompressProblem", "RATIOS", "POOL_GROUPS"]
