"""The seed's routing-attribution benchmark: uint8 [1_000_000, 8, 4] payload, 900,000 reused
rows, 100,001 new tokens in the final node (payload one row short), lazy last-row padding
against the old rule (pad the whole payload first), side by side.

    python bench/replay/replay_bench.py [--repeat 30]

Peak allocation from tracemalloc (numpy reports its buffers there), retained bytes of the
node arrays, median wall time (CPU).
"""

import argparse
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "replay"))
from ds4kern.replay import attribute_routing  # noqa: E402
from test_replay import old_rule  # noqa: E402

SHAPE, REUSED, NEW = (1_000_000, 8, 4), 900_000, 100_001


def measure(fn, arr, repeat):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    got = fn(arr, REUSED, [NEW])
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    retained = sum(a.nbytes for a in got if a is not None)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(arr, REUSED, [NEW])
        times.append(time.perf_counter() - t0)
    return dict(peak_mib=(peak - base) / 2**20, retained=retained, median_ms=1e3 * statistics.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    arr = np.random.default_rng().integers(0, 256, SHAPE, dtype=np.uint8)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}, payload {SHAPE} uint8, "
          f"{REUSED} reused rows, {NEW} new tokens")
    print("| rule | peak alloc MiB | retained bytes | median ms |\n|---|---|---|---|")
    for name, fn in (("lazy last-row padding (ds4kern)", attribute_routing), ("old: pad whole payload", old_rule)):
        r = measure(fn, arr, args.repeat)
        print(f"| {name} | {r['peak_mib']:.2f} | {r['retained']:,} | {r['median_ms']:.2f} |")


if __name__ == "__main__":
    main()
