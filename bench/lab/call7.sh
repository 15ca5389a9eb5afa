#!/usr/bin/env bash
# Device call (fourth session): topk after the radix default change: GPU tests, the top-k bench on
# long rows, the indexer decode bench (whose selection is topk_rows).
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
(timeout 200 python3 -m pytest -q -p no:cacheprovider -rf -m gpu tests/topk >"$OUT/tests.txt" 2>&1; echo "exit $?" >>"$OUT/tests.txt") &
wait
tail -3 "$OUT/tests.txt"
timeout 80 python3 bench/topk/topk_bench.py --shapes 8x262144x512 1x65536x1024 8x262144x1024 64x65536x1024 --repeat 10 \
  >"$OUT/bench_topk.txt" 2>&1; echo "== topk exit $?"; grep -vE "^\s*$" "$OUT/bench_topk.txt" | grep -v "per_thread=.*per_thread" | tail -24
timeout 120 python3 bench/indexer/indexer_bench.py --shapes decode1 decode8 --formats fp8 bf16 >"$OUT/bench_idx.txt" 2>&1
echo "== idx exit $?"; tail -12 "$OUT/bench_idx.txt"
