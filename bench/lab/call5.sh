#!/usr/bin/env bash
# Device call (fourth session): hc after the one-wave slice fix and the measured rule: GPU tests,
# sanitizer on the tiled kernels, the hc bench at B >= 256 (auto, tiled, grouped), the step at B=256.
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -1
P="python3 -m pytest -q -p no:cacheprovider -rf -m gpu"
(timeout 240 $P tests/hyper_connections tests/models/test_deepseek_v4_step.py >"$OUT/tests.txt" 2>&1; echo "exit $?" >>"$OUT/tests.txt") &
(timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 $P -x tests/hyper_connections/test_hc_gpu.py \
   -k "tiled or B1024" >"$OUT/sanitizer.txt" 2>&1; echo "exit $?" >>"$OUT/sanitizer.txt") &
wait
tail -4 "$OUT/tests.txt"; grep -E "ERROR SUMMARY|passed|failed|^exit" "$OUT/sanitizer.txt"
timeout 150 python3 bench/hyper_connections/hc_bench.py --tokens 256 1024 4096 --repeat 30 --no-compile \
  --variants auto tiled grouped naive >"$OUT/bench_hc.txt" 2>&1; echo "== hc exit $?"
grep -E "auto|tiled" "$OUT/bench_hc.txt"
timeout 120 python3 bench/models/step_bench.py --batches 256 >"$OUT/step.txt" 2>&1; echo "== step exit $?"; tail -15 "$OUT/step.txt"
