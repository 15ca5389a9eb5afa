"""The static dispatch rules of moe_permute and moe_unpermute over their built-in variants.

moe_permute: ``single_block`` while T * k (its power-of-two bucket) is below
``DS4KERN_MOE_CHUNKED_MIN_ENTRIES`` (default 8192), ``chunked`` from there.  The reasoning,
provisional until measured on the device (bench/moe/PERFORMANCE.md): one block of 16 warps walks
T * k / 16 entries per warp twice, so its time grows with T * k; chunked spreads the walk over
T * k / 1024 blocks but costs three launches and a round trip of chunk counts through global
memory, which only pays once the single block's walk is longer than those.  moe_unpermute has one
CUDA variant.  ``DS4KERN_VARIANT=moe_permute=<name>`` and autotune override the rule.
"""

from __future__ import annotations

from ...core.env import env_int
from ...core.op import reference_or

# Provisional until measured on the device: chunked from this T * k bucket on.
CHUNKED_MIN_ENTRIES = env_int("DS4KERN_MOE_CHUNKED_MIN_ENTRIES", 8192, minimum=0)


def permute_rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a moe_permute problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    n = p.entries_bucket
    if "chunked" in ok and n >= CHUNKED_MIN_ENTRIES:
        return "chunked", f"T*k bucket {n} >= {CHUNKED_MIN_ENTRIES}: the sort spread over blocks (provisional)"
    if "single_block" in ok:
        return "single_block", f"T*k bucket {n} < {CHUNKED_MIN_ENTRIES}: one block, one launch (provisional)"
    return sorted(ok)[0], "the first variant by name that can run it"


unpermute_rule = reference_or("naive")
