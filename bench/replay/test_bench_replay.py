"""pytest-benchmark: routing attribution, lazy last-row padding vs the old full-padding rule
(the seed's case).  ``python -m pytest bench/replay/test_bench_replay.py --benchmark-only``"""

import numpy as np
import pytest

import replay_bench as rb
from ds4kern.replay import attribute_routing


@pytest.fixture(scope="module")
def payload():
    return np.random.default_rng().integers(0, 256, rb.SHAPE, dtype=np.uint8)


@pytest.mark.parametrize("rule", ["lazy", "old"])
def test_attribution(benchmark, payload, rule):
    benchmark.group = "routing attribution, seed case"
    fn = attribute_routing if rule == "lazy" else rb.old_rule
    r = rb.measure(fn, payload, repeat=1)
    benchmark.extra_info.update(rule=rule, peak_mib=r["peak_mib"], retained=r["retained"])
    got = benchmark(fn, payload, rb.REUSED, [rb.NEW])
    assert got[0].nbytes == 3_200_032
