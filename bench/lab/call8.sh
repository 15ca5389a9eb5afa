#!/usr/bin/env bash
# Device call (fourth session): topk's radix default (fewest levels, then smallest chunk) on the
# long-row shapes, and the indexer decode bench.
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
timeout 80 python3 bench/topk/topk_bench.py --shapes 8x262144x512 8x262144x1024 64x65536x1024 1x65536x1024 --repeat 10 \
  >"$OUT/bench_topk.txt" 2>&1; echo "== topk exit $?"; grep -E "^R=|radix|torch" "$OUT/bench_topk.txt"
timeout 120 python3 bench/indexer/indexer_bench.py --shapes decode1 decode8 decode64 >"$OUT/bench_idx.txt" 2>&1
echo "== idx exit $?"; grep -E "^decode|topk_rows|mma|torch eager" "$OUT/bench_idx.txt"
