"""Launch each router_topk CUDA variant a few times at T=65536 (for ncu / nsys).

    ncu --kernel-name regex:router_topk --launch-skip 2 --launch-count 2 python bench/profile_router.py
"""

import sys

import cupy as cp
import numpy as np

import ds4kern
from ds4kern._arrays import BFLOAT16

T, E, K = 65536, 256, 6
dtype = BFLOAT16 if "bf16" in sys.argv else np.float32
variants = [a for a in sys.argv[1:] if a != "bf16"] or ["naive", "threshold"]
x = cp.asarray(np.random.default_rng().standard_normal((T, E), dtype=np.float32).astype(dtype))
b = cp.asarray((0.1 * np.random.default_rng().standard_normal(E)).astype(np.float32))
w, i = cp.empty((T, K), cp.float32), cp.empty((T, K), cp.int32)
for v in variants:
    for _ in range(4):
        ds4kern.router_topk(x, K, score_function="sqrtsoftplus", expert_bias=b, scaling_factor=1.5, out=(w, i),
                            variant=v)
cp.cuda.Device().synchronize()
