"""Lab: launch hc_pre and topk_rows variants a few times at one large shape (for ncu).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --kernel-name regex:'hc_pre|topk' --launch-skip 2 --launch-count 8 \
        python bench/lab/profile_ops.py hc 4096 7168 tiled grouped
    ... python bench/lab/profile_ops.py topk 8 262144 512 radix hist

hc: B tokens, D, then variants (bfloat16 streams, the hc bench's inputs).
topk: R rows, C columns, k, then variants (float32 normal scores).
"""

from __future__ import annotations

import pathlib
import sys

import cupy as cp
import numpy as np

import ds4kern

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "hyper_connections"))


def main(argv):
    rng = np.random.default_rng(1)
    if argv[0] == "hc":
        from hc_bench import make_set, op_args, outputs  # noqa: E402  (the bench's own inputs)

        B, D = int(argv[1]), int(argv[2])
        s = make_set(cp, rng, B, D, "bfloat16")
        out = outputs(cp, "hc_pre", B, D, "bfloat16")
        for v in argv[3:]:
            for _ in range(4):
                ds4kern.hc_pre(*op_args("hc_pre", s), out=out, variant=v)
    else:
        R, C, k = (int(a) for a in argv[1:4])
        x = cp.asarray(rng.standard_normal((R, C), dtype=np.float32))
        out = cp.empty((R, k), cp.int32)
        for v in argv[4:]:
            for _ in range(4):
                ds4kern.topk_rows(x, k, out=out, variant=v)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
