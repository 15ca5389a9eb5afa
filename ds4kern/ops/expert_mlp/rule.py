"""expert_mlp's static dispatch rule over its built-in variants.

Provisional until measured on the device (bench/expert_mlp/PERFORMANCE.md): the weights dominate
the bytes, and only ``grouped`` reads each touched expert's weights once per row group in two
launches without a host synchronisation, so it wins wherever its ``supports`` accepts the problem;
``naive`` (cuBLAS per touched expert, synchronising) covers the rest.
``DS4KERN_VARIANT=expert_mlp=<name>`` and autotune override the rule.
"""

from __future__ import annotations


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    if "grouped" in ok:
        return "grouped", ("tensor cores, each touched expert's weights streamed once per row group, two launches, "
                           "no host synchronisation (provisional: not yet measured)")
    if "naive" in ok:
        return "naive", "grouped cannot run it"
    return sorted(ok)[0], "the first variant by name that can run it"
