"""indexer_topk's static dispatch rule over its built-in variants.

Provisional until measured on the device (bench/indexer/PERFORMANCE.md): there is no measured
threshold yet, so the rule is the tensor-core variant wherever its ``supports`` accepts the
problem (sm_80+, enough shared memory), else the CUDA-core twin of the reference.
``DS4KERN_VARIANT=indexer_topk=<name>`` and autotune override the rule.
"""

from __future__ import annotations


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    if "mma" in ok:
        return "mma", "tensor cores: each key tile is read once and serves all 64 heads (provisional: not yet measured)"
    if "naive" in ok:
        return "naive", "the tensor-core variant cannot run it"
    return sorted(ok)[0], "the first variant by name that can run it"
