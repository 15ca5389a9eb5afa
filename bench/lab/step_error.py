"""Where the decode step's distance from the float64 reference comes from: per step, the GPU
kernels and the numpy-backend pipeline (the ops' references, bf16 roundings at the same points)
on the same seeds.  python bench/lab/step_error.py [--seeds 7 8 9]"""
import argparse

import numpy as np

from ds4kern.models.deepseek_v4 import config as C
from ds4kern.models.deepseek_v4.run import check_steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    backends = [("numpy", np)]
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
        backends.append(("cuda", cp))
    except Exception as e:  # noqa: BLE001
        print(f"no GPU ({type(e).__name__}): numpy backend only")
    for seed in a.seeds:
        for name, xp in backends:
            r = check_steps(C.small(a.dim), 3, a.steps, xp=xp, seed=seed)
            print(f"seed {seed} {name:5s} worst {r['worst']:.4f}  per step " +
                  " ".join(f"{v:.4f}" for v in r["per_step"]))


if __name__ == "__main__":
    main()
