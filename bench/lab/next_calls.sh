#!/usr/bin/env bash
# The device work left open on 2026-12-06 (third session), as two calls of under 10 minutes each.
# Fourth session: A and B ran on an H100 (results on the performance pages); only B's CSA block at
# B = 256, 1M tokens is still open: it needs an H200, which did not come.
# Run on an H200 (`run` with kind nvidia-h200): the CSA attention block at B = 256 and 1M tokens
# needs more than an H100's 80 GB; everything else runs there too (peers in the same run).
#   A: GPU tests of what changed without a GPU (topk hist, hc split's slice_chunks and hc_pre tiled,
#      the per-step recorder), compute-sanitizer on topk hist and on the router and compressor suites (#22),
#      then the top-k and hyper-connection benchmarks.
#      run: MODE=A bash bench/lab/next_calls.sh
#   B: #22's before / after router and compressor benchmarks (the pre-layout tree in .old, carried:
#      carry [".old"]) and threshold vs warp; #26's CSA block at B = 256, 1M; #27's torch composite
#      at B = 256.   run: MODE=B bash bench/lab/next_calls.sh      (logs to $OUT, at most 8 files)
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
P="python3 -m pytest -q -p no:cacheprovider -rf -m gpu"
S="compute-sanitizer --tool memcheck --error-exitcode 9 $P -x"
if [ "${MODE:-A}" = A ]; then
  (timeout 300 $P tests/topk tests/hyper_connections tests/models/test_deepseek_v4_step.py >"$OUT/tests.txt" 2>&1
   echo "exit $?" >>"$OUT/tests.txt") &
  (for t in "tests/topk/test_topk_gpu.py -k not+largest+and+not+property" \
            "tests/router/test_router_property.py -k not+nothing" \
            "tests/router/test_router_gpu.py -k test_grouped_direct_path_at_every_size+and+256-8-8-4" \
            "tests/compressor/test_compressor_gpu.py -k not+property" \
            "tests/hyper_connections/test_hc_gpu.py -k B3-D4096+or+B1024"; do
     set -- $t; k=${3//+/ }; echo "== sanitizer $1 -k '$k'"
     timeout 100 $S "$1" -k "$k" 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}"
   done >"$OUT/sanitizer.txt" 2>&1) &
  wait
  grep -E "passed|failed|^FAILED|^exit" "$OUT/tests.txt" | tail -12; grep -E "^==|ERROR SUMMARY|exit" "$OUT/sanitizer.txt"
  timeout 90 python3 bench/topk/topk_bench.py --shapes 4x8192x512 8x8192x512 8x262144x512 1x65536x1024 --repeat 10 >"$OUT/bench_topk.txt" 2>&1
  echo "== topk exit $?"; tail -30 "$OUT/bench_topk.txt"
  timeout 100 python3 bench/hyper_connections/hc_bench.py --repeat 30 --no-compile >"$OUT/bench_hc.txt" 2>&1
  echo "== hc exit $?"; grep -E "split|auto" "$OUT/bench_hc.txt" | grep -E "\| (1|8|64) \|" | head -40
  grep -E "tiled|auto|grouped" "$OUT/bench_hc.txt" | grep -E "\| (1024|4096) \|" | head -40
  timeout 90 python3 bench/lab/step_parts.py --batches 1 64 >"$OUT/step_parts.txt" 2>&1; echo "== parts exit $?"
  cat "$OUT/step_parts.txt"
else
  mkdir -p /tmp/ab; OLD=$PWD/.old OUT=/tmp/ab timeout 330 bash bench/lab/ab_old_new.sh >/tmp/ab/ab.txt 2>&1
  echo "== ab exit $?"; tar czf "$OUT/ab.tgz" -C /tmp/ab .; tail -40 /tmp/ab/ab.txt  # (8 files come back at most)
  timeout 90 python3 bench/lab/threshold_vs_warp.py >"$OUT/threshold_vs_warp.txt" 2>&1; echo "== tvw exit $?"
  tail -20 "$OUT/threshold_vs_warp.txt"
  timeout 90 python3 bench/models/attention_bench.py --kinds csa --batches 256 --contexts 1048576 --steps 5 \
    >"$OUT/bench_att.txt" 2>&1; echo "== att exit $?"; cat "$OUT/bench_att.txt"
  timeout 120 python3 bench/models/torch_composite.py --batch 256 --steps 5 >"$OUT/bench_comp.txt" 2>&1
  echo "== comp exit $?"; tail -8 "$OUT/bench_comp.txt"
fi
