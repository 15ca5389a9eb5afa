"""ds4kern: GPU kernels for DeepSeek-V4 inference and MoE training.

Ops take CuPy arrays (or torch CUDA tensors, zero-copy) and run CUDA variants; numpy arrays run
the reference backend.  Variants register through a pluggy registry; a dispatcher picks one per
shape, and :func:`explain` says which and why.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import autotune
from .dispatch import use_variant
from .hookspecs import hookimpl
from .ops import OPS as _OPS
from .ops.compressor import compress_decode, compress_prefill
from .ops.router import router_hash, router_topk
from .ops.router_te import (router_aux_loss, router_aux_loss_backward, router_aux_scores,
                             router_aux_scores_backward, router_topk_backward, router_topk_dense)
from .recorder import LocalityRecorder
from .registry import PluginWarning, Variant, registry
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
    "rope_table",
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

    Returns a :class:`ds4kern.dispatch.Decision`; ``print()`` it to see every candidate variant,
    why each was rejected, and which one is chosen and why.
    """
    try:
        _, explain_fn = _OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; ops: {sorted(_OPS)}") from None
    return explain_fn(*args, **kwargs)


def variants(op: str | None = None) -> list:
    """Registered variants (of one op, or all)."""
    return registry.variants(op)


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a plugin object with ``@ds4kern.hookimpl`` functions at run time; returns its name."""
    return registry.register_plugin(plugin, name)


def unregister_plugin(name_or_plugin) -> None:
    """Remove a plugin registered at run time (or any plugin, by name)."""
    registry.unregister_plugin(name_or_plugin)
