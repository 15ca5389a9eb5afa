#!/usr/bin/env bash
# One device-machine call: install, GPU tests, compute-sanitizer, main job, benchmarks.
# Logs go to $OUT (or ./gpu_out).  Usage: bash bench/gpu_session.sh [quick]
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
step() { echo; echo "=== $* ($(date +%T))"; }
step install
$py -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$py -m ds4kern info 2>&1 | tee "$OUT/info.txt"
step gpu tests
$py -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
step cli tests
$py -m pytest -q tests/test_cli.py -p no:cacheprovider 2>&1 | tail -3
step main job
$py -m ds4kern run --tokens 65536 2>&1 | tee "$OUT/run.txt"
$py -m ds4kern run --tokens 128 --dtype bfloat16 2>&1 | tee -a "$OUT/run.txt"
if [ "${1:-}" != quick ]; then
  step compute-sanitizer
  timeout 420 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -x -m gpu tests/test_router_gpu.py \
     -k "not largest and not torch" -p no:cacheprovider > "$OUT/sanitizer.txt" 2>&1
  echo "sanitizer exit $?"; tail -5 "$OUT/sanitizer.txt"
fi
step overhead
$py bench/overhead.py ${PROFILE:+--profile} 2>&1 | tee "$OUT/overhead.txt" | head -60
step bench
$py bench/router_bench.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
