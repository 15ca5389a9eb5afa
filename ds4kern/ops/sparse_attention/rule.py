"""sparse_attention's static dispatch rule over its built-in variants.

Thresholds are provisional until measured on the device (bench/sparse_attention/PERFORMANCE.md);
``DS4KERN_VARIANT=sparse_attention=<name>`` and autotune override the rule.
"""

from __future__ import annotations

from .kernels import head_blocks, head_groups

# Provisional until measured on the device.
SPLIT_K_MAX_BLOCKS = 64   # split_k while head_batched would launch fewer blocks than this (H100: 132 SMs)
SPLIT_K_MIN_SLOTS = 256   # ... and a row has at least this many slots to spread
NAIVE_MAX_HEADS = 2       # naive for 1-2 heads: a 16-head tensor-core tile would be mostly padding


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    blocks = p.rows_bucket * head_blocks(p.heads)
    if "split_k" in ok and blocks < SPLIT_K_MAX_BLOCKS and p.slots_bucket >= SPLIT_K_MIN_SLOTS:
        return "split_k", (f"N x head tiles = {blocks} < {SPLIT_K_MAX_BLOCKS} blocks and K >= {SPLIT_K_MIN_SLOTS}: "
                           "spread the slots over more blocks (provisional threshold)")
    if "head_batched" in ok and p.heads > NAIVE_MAX_HEADS:
        return "head_batched", f"tensor cores, each gathered KV tile serves {16 * head_groups(p.heads)} heads"
    if "naive" in ok:
        return "naive", (f"H={p.heads} <= {NAIVE_MAX_HEADS}" if p.heads <= NAIVE_MAX_HEADS
                         else "the tensor-core variants cannot run it")
    return sorted(ok)[0], "the first variant by name that can run it"
