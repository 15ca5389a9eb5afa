"""Launch LocalityRecorder.record a few times (for ncu / nsys): the Flash router's output at T
tokens, one token per sequence (decode-like), as bench/locality/recorder_bench.py records it.  With
``step``: record_step over 43 layers' outputs in one [T, 43, 6] uint8 buffer.

    ncu --kernel-name regex:locality --launch-skip 4 --launch-count 4 python bench/lab/profile_recorder.py [step] [T ...]
"""

import sys

import cupy as cp
import numpy as np

import ds4kern

E, k, L = 256, 6, 43
rng = np.random.default_rng(0)
step = "step" in sys.argv
for T in [int(a) for a in sys.argv[1:] if a != "step"] or [4096]:
    bias = cp.asarray((0.1 * rng.standard_normal(E)).astype(np.float32))
    n = L if step else 1
    cap_i, cap_w = cp.empty((T, n, k), cp.uint8), cp.empty((T, n, k), cp.float32)
    for layer in range(n):
        x = cp.asarray(rng.standard_normal((T, E)).astype(np.float32))
        ds4kern.router_topk(x, k, score_function="sqrtsoftplus", expert_bias=bias, scaling_factor=1.5,
                            out=(cap_w[:, layer], cap_i[:, layer]))
    rec = ds4kern.LocalityRecorder(n, E, k, max_sequences=T)
    seq = cp.arange(T, dtype=cp.int32)
    pos = cp.zeros(T, cp.int32)
    for _ in range(4):
        if step:
            rec.record_step(cap_i, weights=cap_w, positions=pos, seq_ids=seq)
        else:
            rec.record(0, cap_i[:, 0], weights=cap_w[:, 0], positions=pos, seq_ids=seq)
cp.cuda.Device().synchronize()
