"""topk_rows' static dispatch rule over its built-in variants.

radix everywhere: it was the fastest at every shape measured on an H100 (bench/topk/PERFORMANCE.md:
sort up to 4x slower at C = 8192, hist 3-105% slower); sort is the reference's GPU twin (O(C log^2 C)
work) and hist is autotune-only.  ``DS4KERN_VARIANT=topk_rows=<name>`` and autotune override the
rule.
"""

from __future__ import annotations


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    if "radix" in ok:
        return "radix", "radix select: a few passes over keys staged in shared memory, then a sort of the k winners"
    return sorted(ok)[0], "radix cannot run it; the first variant by name that can"
