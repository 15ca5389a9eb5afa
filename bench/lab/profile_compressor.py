"""Launch compress_decode (every row emitting) a few times per configuration, for ncu / nsys.

    ncu --kernel-name regex:compress_decode --cache-control all --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python bench/lab/profile_compressor.py 4:512:256 128:512:256
Arguments: ratio:d:B[:pool_group] (default 4:512:256 128:512:256).
"""

import sys

import cupy as cp
import numpy as np

import ds4kern
from ds4kern.ops.compressor import coff_of, init_state

rng = np.random.default_rng(0)
for spec in sys.argv[1:] or ["4:512:256", "128:512:256"]:
    parts = [int(x) for x in spec.split(":")]
    R, d, B = parts[:3]
    g = parts[3] if len(parts) > 3 else None
    c = coff_of(R)
    ks, ss = (cp.asarray(a) for a in init_state(B, R, d))
    ks[...] = cp.asarray(rng.standard_normal(ks.shape).astype(np.float32))
    ss[...] = cp.asarray(rng.standard_normal(ss.shape).astype(np.float32))
    cos, sin = ds4kern.rope_table(8 * R, theta=160000.0, device=True)
    args = [cp.asarray(rng.standard_normal((B, c * d)).astype(np.float32)) for _ in range(2)]
    args += [cp.asarray(rng.standard_normal((R, c * d)).astype(np.float32)), cp.ones(d, cp.float32),
             cp.asarray((rng.integers(0, 8, B) * R + R - 1).astype(np.int32)), cos, sin, ks, ss,
             cp.zeros((B, 8, d), cp.float32)]
    for _ in range(3):
        ds4kern.compress_decode(*args, ratio=R, variant=None if g is None else "grouped", pool_group=g)
cp.cuda.Device().synchronize()
