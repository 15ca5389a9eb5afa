"""The static dispatch rule of ``hc_pre`` and ``hc_post_pre`` over their built-in variants.

Every threshold names the measurement behind it (bench/hyper_connections/PERFORMANCE.md, "Data
behind the dispatch rule": NVIDIA H100 80GB HBM3, CUDA-graph replay, D = 4096 and 7168, X
bfloat16 and float32).  The reasoning: every block reads its slice of hc_fn (96 D bytes per token
group), so per-token blocks pull many times X's bytes from L2 and small B leaves multiprocessors
idle.  split spreads a token group over several blocks (small B); tiled stages hc_fn once per 256
tokens and runs the dots as a tiled product (large B); naive and grouped remain where tiled cannot
run (D not a multiple of 32, or no 4-channel accesses) and naive between split and tiled in
hc_post_pre.  ``DS4KERN_HC_*`` move the edges for sweeps; ``DS4KERN_VARIANT=hc_pre=<name>`` and
autotune override the rule.
"""

from __future__ import annotations

from ...core.env import env_int

# split up to B bucket 128: at B <= 8 it wins every measured case; at B=64 tiled loses 3 of 4
# (hc_pre bf16 D=4096 45.1 vs split 35.0) and ties one; at B=128 tiled wins 3 of 4 hc_pre cases
# (bf16 D=7168 58.9 vs 68.7) but loses bf16 D=4096 (49.0 vs 43.1), and the bucket holds B=65..128;
# split wins 3 of 4 hc_post_pre cases at 128.
SPLIT_MAX_TOKENS = env_int("DS4KERN_HC_SPLIT_MAX_TOKENS", 128, minimum=0)
# hc_pre: tiled from bucket 256 on, where it wins every measured case (B=256 bf16 D=7168 76.7 vs
# split 89.7, naive 109.5; bf16 D=4096 62.8 vs split 63.6, the narrowest; B=4096 bf16 D=7168 437.6
# vs grouped 914.7).  B=129..255 (in bucket 256) was not measured.
TILED_MIN_TOKENS = env_int("DS4KERN_HC_TILED_MIN_TOKENS", 256, minimum=0)
# hc_post_pre: tiled from bucket 512 on, 9 of 12 measured cases at 512-4096 (B=512 bf16 D=7168
# 134.7 vs grouped 162.3; grouped wins float32 at 512 by 6-25%); at 256 naive wins 3 of 4 (bf16
# D=4096 54.0 vs tiled 64.2).
POST_PRE_TILED_MIN_TOKENS = env_int("DS4KERN_HC_POST_PRE_TILED_MIN_TOKENS", 512, minimum=0)
# where tiled cannot run: grouped from this bucket on, naive below it.  Measured only with 4-channel
# accesses (the scalar path tiled leaves to them was not timed): grouped wins B=1024 bf16 D=7168
# (232.5 vs naive 305.5) but loses B=4096 bf16 D=4096 (514.6 vs naive 471.7).
GROUPED_MIN_TOKENS = env_int("DS4KERN_HC_GROUPED_MIN_TOKENS", 512, minimum=0)


def rule(p, ok: frozenset) -> tuple[str, str]:
    """``(variant, reason)`` for a problem; ``ok``: the built-ins that can run it."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    B = p.tokens_bucket
    if "split" in ok and B <= SPLIT_MAX_TOKENS:
        return "split", f"B bucket {B} <= {SPLIT_MAX_TOKENS}: spread each token group over blocks"
    tiled_min = POST_PRE_TILED_MIN_TOKENS if p.y_dtype else TILED_MIN_TOKENS
    if "tiled" in ok and B >= tiled_min:
        return "tiled", f"B bucket {B} >= {tiled_min}: a tiled product shares each staged hc_fn chunk by 256 tokens"
    if "grouped" in ok and B >= GROUPED_MIN_TOKENS:
        short = "tiled cannot run it" if "tiled" not in ok else f"below tiled's edge {tiled_min}"
        return "grouped", f"B bucket {B} >= {GROUPED_MIN_TOKENS}, {short}: tokens share each hc_fn load"
    if "naive" in ok:
        return "naive", f"B bucket {B}: between split's and tiled's ranges, or they cannot run it"
    return sorted(ok)[0], "the first variant by name that can run it"
