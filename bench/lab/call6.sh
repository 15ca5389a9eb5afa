#!/usr/bin/env bash
# Device call (fourth session), on an H200 (needs_h200): hc GPU tests after the x_in tolerance
# fix, and #26's CSA attention block at B = 256, 1M tokens (81 GiB of state).
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 bench/models/attention_bench.py --kinds csa --batches 256 --contexts 1048576 --steps 5 \
  >"$OUT/bench_att.txt" 2>&1; echo "== att exit $?"; cat "$OUT/bench_att.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rf -m gpu tests/hyper_connections >"$OUT/tests.txt" 2>&1
echo "exit $?" >>"$OUT/tests.txt"; tail -4 "$OUT/tests.txt"
