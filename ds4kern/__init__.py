"""ds4kern: GPU kernels for DeepSeek-V4 inference and MoE training.

Ops take CuPy arrays (or torch CUDA tensors, zero-copy) and run CUDA variants; numpy arrays run
the reference backend.  Variants register through a pluggy registry; a dispatcher picks one per
shape, and :func:`explain` says which and why.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers every op with the core)
from .core import autotune
from .core.dispatch import use_variant
from .core.hookspecs import hookimpl
from .core.op import get_op
from .core.registry import PluginWarning, Variant, registry
from .core.scope import scope
from .locality.recorder import LocalityRecorder
from .ops.compressor import compress_decode, compress_prefill
from .ops.hyper_connections import hc_post, hc_post_pre, hc_pre
from .ops.expert_mlp import expert_mlp, grouped_linear
from .ops.indexer import indexer_topk
from .ops.moe import MoePermutation, moe_permute, moe_unpermute
from .ops.norm import rms_norm, rope_rotate
from .ops.router import router_topk
from .ops.router_hash import router_hash
from .ops.sparse_attention import pack_kv_fp8, sparse_attention, unpack_kv_fp8
from .ops.topk import topk_rows
from .ops.router_te import (router_aux_loss, router_aux_loss_backward, router_aux_scores,
                             router_aux_scores_backward, router_topk_backward, router_topk_dense)
from .rope import rope_table

__all__ = [
    "__version__",
    "router_topk",
    "router_hash",
    "router_topk_dense",
    "router_topk_backward",
    "router_aux_scores",
    "router_aux_scores_backward",
    "router_aux_loss",
    "router_aux_loss_backward",
    "compress_decode",
    "compress_prefill",
    "sparse_attention",
    "hc_pre",
    "hc_post",
    "hc_post_pre",
    "topk_rows",
    "indexer_topk",
    "moe_permute",
    "expert_mlp",
    "grouped_linear",
    "rms_norm",
    "rope_rotate",
    "moe_unpermute",
    "MoePermutation",
    "pack_kv_fp8",
    "unpack_kv_fp8",
    "rope_table",
    "scope",
    "LocalityRecorder",
    "explain",
    "use_variant",
    "autotune",
    "variants",
    "register_plugin",
    "unregister_plugin",
    "hookimpl",
    "Variant",
    "PluginWarning",
]


def explain(op: str, *args, **kwargs):
    """How the dispatcher would handle ``op(*args, **kwargs)``, without running it.

    Returns a :class:`ds4kern.core.dispatch.Decision`; ``print()`` it to see every candidate
    variant, why each was rejected, and which one is chosen and why.  Takes the op's own
    arguments (validated as a call would), so a bad argument raises the same error.
    """
    return get_op(op).explain(*args, **kwargs)


def variants(op: str | None = None) -> list:
    """Registered variants (of one op, or all); an unknown op name raises ValueError."""
    if op is not None:
        get_op(op)  # names the known ops when op is not one of them
    return registry.variants(op)


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a plugin object with ``@ds4kern.hookimpl`` functions at run time; returns its name."""
    return registry.register_plugin(plugin, name)


def unregister_plugin(name_or_plugin) -> None:
    """Remove a plugin registered at run time (or any plugin, by name)."""
    registry.unregister_plugin(name_or_plugin)
