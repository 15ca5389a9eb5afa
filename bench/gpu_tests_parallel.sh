#!/usr/bin/env bash
# All GPU tests in four parallel pytest processes on one card (the tests are small; compiling
# kernels dominates), each log under $OUT, then a one-line summary per group.
#   bash bench/gpu_tests_parallel.sh [seconds-per-group]      (default 520)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
T=${1:-520}
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
declare -A G=(
  [g1_router]="tests/router tests/router_te tests/router_hash"
  [g2_comp]="tests/compressor tests/replay tests/locality tests/core tests/test_cli.py tests/test_docs.py"
  [g3_sa_hc]="tests/sparse_attention tests/hyper_connections"
  [g4_ix_models]="tests/indexer tests/topk tests/models"
)
for g in "${!G[@]}"; do
  ( timeout "$T" python3 -m pytest -q -m gpu ${G[$g]} -p no:cacheprovider -rf --durations=8 \
      ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/$g.txt" 2>&1; echo "exit $?" >> "$OUT/$g.txt" ) &
done
wait
for g in $(echo "${!G[@]}" | tr ' ' '\n' | sort); do
  echo "== $g: $(grep -E '(passed|failed|error)' "$OUT/$g.txt" | tail -1) $(tail -1 "$OUT/$g.txt")"
  grep -E '^(FAILED|ERROR)' "$OUT/$g.txt" | head -12
done
