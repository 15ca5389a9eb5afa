"""The static dispatch rule of ``hc_pre`` and ``hc_post_pre`` over their built-in variants.

The token thresholds are provisional until measured on the device (bench/hyper_connections/
PERFORMANCE.md will hold the numbers behind them).  The reasoning they stand on: every block
reads its slice of hc_fn (96 D bytes per token group, 24 floats per stream element), so one
block per token (naive) pulls 24 x (float32) or 48 x (bf16) X's bytes from L2 per token, and
small B leaves most multiprocessors idle.  split spreads a token group over several blocks (small
B); grouped shares each hc_fn load among 2-4 tokens (large B); naive sits between.
``DS4KERN_HC_SPLIT_MAX_TOKENS`` / ``DS4KERN_HC_GROUPED_MIN_TOKENS`` move the edges for sweeps;
``DS4KERN_VARIANT=hc_pre=<name>`` and autotune override the rule.
"""

from __future__ import annotations

from ...core.env import env_int

# Provisional until measured on the device: split while the token bucket is at most this ...
SPLIT_MAX_TOKENS = env_int("DS4KERN_HC_SPLIT_MAX_TOKENS", 128, minimum=0)
# ... grouped from this token bucket on, naive between the two.
GROUPED_MIN_TOKENS = env_int("DS4KERN_HC_GROUPED_MIN_TOKENS", 512, minimum=0)


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    B = p.tokens_bucket
    if "split" in ok and B <= SPLIT_MAX_TOKENS:
        return "split", f"B bucket {B} <= {SPLIT_MAX_TOKENS}: spread each token group over blocks (provisional)"
    if "grouped" in ok and B >= GROUPED_MIN_TOKENS:
        return "grouped", f"B bucket {B} >= {GROUPED_MIN_TOKENS}: tokens share each hc_fn load (provisional)"
    if "naive" in ok:
        return "naive", f"B bucket {B} between split's and grouped's ranges, or they cannot run it"
    return sorted(ok)[0], "the first variant by name that can run it"
