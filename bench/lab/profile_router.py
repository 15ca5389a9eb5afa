"""Launch router_topk CUDA variants a few times at T=65536 (for ncu / nsys).

    ncu --kernel-name regex:router_topk --launch-skip 2 --launch-count 2 python bench/lab/profile_router.py [variants] [bf16] [v3]

Configuration: DeepSeek-V4-Flash (E=256, k=6, sqrtsoftplus + bias), or with ``v3`` DeepSeek-V3
style (k=8, sigmoid + bias, 8 groups, top 4 groups).
"""

import sys

import cupy as cp
import numpy as np

import ds4kern
from ds4kern.core.arrays import BFLOAT16

T, E = 65536, 256
dtype = BFLOAT16 if "bf16" in sys.argv else np.float32
v3 = "v3" in sys.argv
K = 8 if v3 else 6
kw = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5) if v3 else \
    dict(score_function="sqrtsoftplus", scaling_factor=1.5)
variants = [a for a in sys.argv[1:] if a not in ("bf16", "v3")] or ["naive", "threshold"]
x = cp.asarray(np.random.default_rng().standard_normal((T, E), dtype=np.float32).astype(dtype))
b = cp.asarray((0.1 * np.random.default_rng().standard_normal(E)).astype(np.float32))
w, i = cp.empty((T, K), cp.float32), cp.empty((T, K), cp.int32)
for v in variants:
    for _ in range(4):
        ds4kern.router_topk(x, K, expert_bias=b, out=(w, i), variant=v, **kw)
cp.cuda.Device().synchronize()
