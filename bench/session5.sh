#!/usr/bin/env bash
# Fifth session's device call: the kernels it touched, their benchmarks, memcheck.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
echo "=== tests $(date +%T)"
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_router_te_gpu.py \
  "tests/test_router_gpu.py" -k "group or direct or backward or indices or te_sweep or narrow or odd or aux or empty or bitmap" \
  2>&1 | tee "$OUT/tests.txt" | tail -15
echo "=== bench $(date +%T)"
timeout 120 python3 bench/te_bench.py --tokens 4096 65536 --json "$OUT/te.json" 2>&1 | tee "$OUT/te.txt"
timeout 120 python3 bench/router_bench.py --configs v3 --tokens 1 128 1024 --dtypes float32 bfloat16 \
  --variants grouped naive --json "$OUT/v3.json" 2>&1 | tee "$OUT/v3.txt"
echo "=== memcheck $(date +%T)"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m gpu -p no:cacheprovider \
  tests/test_router_te_gpu.py tests/test_router_gpu.py -k "segments and (33 or 77 or 300) or direct_path and 256" \
  > "$OUT/memcheck.txt" 2>&1; echo "memcheck exit $?"; tail -3 "$OUT/memcheck.txt"
echo "=== done $(date +%T)"
