"""What memory scopes cost when statistics are off (GPU machine): host µs per call of one small
op (``router_topk``, T=128, E=256, k=6) called as users do (the op enters its own scope), inside
one more ``ds4kern.scope``, and with no scope code at all (the op's call path without its scope);
each timed five times so the spread (noise) stands beside the differences.

    python bench/core/scope_overhead.py
"""

from __future__ import annotations

import statistics

import numpy as np


def main() -> None:
    import cupy as cp

    import ds4kern
    from ds4kern.core import scope as S
    from ds4kern.core.op import get_op
    from ds4kern.core.timing import device_name, host_time

    assert S.stats_path() is None, "unset DS4KERN_SCOPE_STATS: this measures scopes with statistics off"
    T, E, k = 128, 256, 6
    rng = np.random.default_rng()
    x = cp.asarray(rng.standard_normal((T, E), dtype=np.float32))
    bias = cp.asarray(rng.standard_normal(E).astype(np.float32))
    w, i = cp.empty((T, k), cp.float32), cp.empty((T, k), cp.int32)
    kw = dict(score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5, out=(w, i))
    op = get_op("router_topk")

    def as_users_call():
        ds4kern.router_topk(x, k, **kw)

    def in_outer_scope():
        with ds4kern.scope("outer"):
            ds4kern.router_topk(x, k, **kw)

    def no_scope_code():
        op._call((x, k), None, dict(kw))  # Op.__call__ minus its `with scope(name)`

    def bare_scope():
        with ds4kern.scope("x"):
            pass

    for f in (as_users_call, in_outer_scope, no_scope_code):
        f()
    cp.cuda.get_current_stream().synchronize()
    print(f"device: {device_name()}; host microseconds per call, 5 repeats of 3000 calls (median [min, max])")
    for name, f in (("no scope code", no_scope_code), ("as users call (op's own scope)", as_users_call),
                    ("inside one more scope", in_outer_scope), ("a bare scope, nothing inside", bare_scope)):
        runs = [host_time(f, 3000) * 1e6 for _ in range(5)]
        print(f"  {name:34s} {statistics.median(runs):7.2f}  [{min(runs):.2f}, {max(runs):.2f}]")


if __name__ == "__main__":
    main()
