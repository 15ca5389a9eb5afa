"""router_topk's static dispatch rule.

Each threshold names the measurement behind it; the numbers are in
``bench/router/PERFORMANCE.md`` ("Data behind the dispatch rule"), all on an NVIDIA H100 80GB
HBM3.  Thresholds read from the environment at import are for sweeps (a malformed value warns
and keeps the default); ``DS4KERN_VARIANT`` / ``ds4kern.use_variant`` force a variant outright.
"""

from __future__ import annotations

from ...core.env import env_int

# rows from the token bucket 12289-16384 (T > 12288), ungrouped: Flash T=16384 rows 16.1 vs
# screened 17.9 us (float32), 14.0 vs 17.4 (bf16); at 12288 within 5%, at 8448 rows loses 13-30%.
ROWS_MIN_TOKENS = env_int("DS4KERN_ROUTER_ROWS_MIN_TOKENS", 16384, minimum=0)
# ... and with group-limited routing (rows' grouped form against `grouped`): V3 style T=16384
# 21.6 vs 28.1 us (float32), 19.7 vs 27.7 (bf16); at 8448 rows loses (18.2 vs 16.1).
ROWS_GROUPED_MIN_TOKENS = env_int("DS4KERN_ROUTER_ROWS_GROUPED_MIN_TOKENS", 16384, minimum=0)
# radix from k = 32 at every E measured (256, 1024, 3072; T=16384: E=256 k=32 radix 65 vs
# screened 76 us), and from k = 16 above E = 1024; it loses at small k (E=256 k=6: 57.5 vs 25.4).
RADIX_MIN_K = env_int("DS4KERN_ROUTER_RADIX_MIN_K", 32, minimum=1)
# threshold beats naive from T = 4096 (by 4-8%) and loses at T <= 128 (6.1-6.4 vs 5.3-5.7 us);
# the rule reaches it only where screened cannot run (512 < E <= 1024).
THRESHOLD_MIN_TOKENS = env_int("DS4KERN_ROUTER_THRESHOLD_MIN_TOKENS", 4096, minimum=0)


def radix_wins(E: int, k: int) -> bool:
    return k >= RADIX_MIN_K or (E > 1024 and k >= 16)


def router_topk_rule(p, ok: frozenset) -> tuple[str, str]:
    """(variant, why) among ``ok``, the built-in variants that support problem ``p``."""
    if "reference" in ok:
        return "reference", "host arrays run the reference backend"
    T, E, k = p.tokens_bucket, p.num_experts, p.topk
    if p.num_groups:
        if "rows" in ok and T >= ROWS_GROUPED_MIN_TOKENS:
            return "rows", f"group-limited, T bucket {T} >= {ROWS_GROUPED_MIN_TOKENS}: rows' grouped form"
        if "grouped" in ok:
            return "grouped", "group-limited routing on whole lanes"
        return _fallback(ok, "group-limited routing that neither rows nor grouped can run")
    if "rows" in ok and T >= ROWS_MIN_TOKENS:
        return "rows", f"T bucket {T} >= {ROWS_MIN_TOKENS}"
    if "radix" in ok and radix_wins(E, k):
        return "radix", f"k={k} >= {RADIX_MIN_K} (or E > 1024 and k >= 16)"
    if "screened" in ok:
        return "screened", f"E={E} <= 512 and k={k} < 32, T bucket {T} below rows' edge"
    if "threshold" in ok and T >= THRESHOLD_MIN_TOKENS:
        return "threshold", f"E={E} beyond screened, T bucket {T} >= {THRESHOLD_MIN_TOKENS}"
    return _fallback(ok, f"E={E}, k={k}")


def _fallback(ok: frozenset, what: str) -> tuple[str, str]:
    # naive runs every E up to 3072; past it, radix is the only kernel
    for name in ("naive", "threshold", "screened", "radix", "rows"):
        if name in ok:
            return name, f"{what}: {name} is the first that runs it (naive, threshold, screened, radix, rows)"
    raise AssertionError(f"router_topk rule offered no known variant: {sorted(ok)}")
