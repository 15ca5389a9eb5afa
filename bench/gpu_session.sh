#!/usr/bin/env bash
# One device-machine call: install, GPU tests, compute-sanitizer, main job, benchmarks.
# Logs go to $OUT (or ./gpu_out).
#   bash bench/gpu_session.sh [quick]              everything (quick: no sanitizer)
#   STAGES="tests compressor" bash bench/gpu_session.sh   only the named stages, of:
#   tests cli run sanitizer sanitizer_new overhead router compressor sparse_attention hyper_connections topk
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
STAGES=${STAGES:-"tests cli run sanitizer sanitizer_new overhead router compressor sparse_attention hyper_connections topk"}
[ "${1:-}" = quick ] && STAGES=${STAGES/sanitizer/}
want() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
step() { echo; echo "=== $* ($(date +%T))"; }
step install
$py -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$py -m ds4kern info 2>&1 | tee "$OUT/info.txt" | head -3
if want tests; then
  step gpu tests
  $py -m pytest -q -m gpu tests/ -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
fi
if want cli; then
  step cli tests
  $py -m pytest -q tests/test_cli.py tests/test_docs.py -p no:cacheprovider 2>&1 | tail -3
fi
if want run; then
  step main job
  $py -m ds4kern run --layers 2 --batch 8 --context 4096 2>&1 | tee "$OUT/run.txt"
  $py -m ds4kern router --tokens 65536 2>&1 | tee -a "$OUT/run.txt"
  $py -m ds4kern router --tokens 128 --dtype bfloat16 2>&1 | tee -a "$OUT/run.txt"
fi
if want sanitizer; then
  step compute-sanitizer
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -x -m gpu tests/router \
     -k "not largest and not torch and not property" -p no:cacheprovider > "$OUT/sanitizer.txt" 2>&1
  echo "sanitizer (router) exit $?"; tail -3 "$OUT/sanitizer.txt"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -x -m gpu tests/compressor \
     -k "not largest and not torch and not autotune and not property" -p no:cacheprovider > "$OUT/sanitizer_compressor.txt" 2>&1
  echo "sanitizer (compressor) exit $?"; tail -3 "$OUT/sanitizer_compressor.txt"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -x -m gpu tests/router_te/test_router_te_gpu.py \
     -k "bitmap or odd or indices or narrow or empty or aux" -p no:cacheprovider > "$OUT/sanitizer_te.txt" 2>&1
  echo "sanitizer (TE forms) exit $?"; tail -3 "$OUT/sanitizer_te.txt"
fi
if want sanitizer_new; then
  step compute-sanitizer, newer ops
  san() {  # san LOG pytest-args...
    local log="$OUT/$1"; shift
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest -q -x -m gpu "$@" \
      -p no:cacheprovider > "$log" 2>&1
    echo "sanitizer ($log) exit $?"; tail -2 "$log"
  }
  san sanitizer_topk.txt tests/topk/test_topk_gpu.py -k "not largest and not property"
  san sanitizer_sa.txt tests/sparse_attention/test_sparse_attention_gpu.py -k "N3-H8-K64 or N8-H64-K129 or fp8_pack or error"
  san sanitizer_hc.txt tests/hyper_connections/test_hc_gpu.py -k "B3-D4096"
fi
if want overhead; then
  step overhead
  $py bench/core/overhead.py ${PROFILE:+--profile} 2>&1 | tee "$OUT/overhead.txt" | head -60
fi
if want router; then
  step router bench
  $py bench/router/router_bench.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
fi
for op in sparse_attention topk; do
  if want $op; then
    step $op bench
    $py bench/$op/${op}_bench.py --json "$OUT/$op.json" 2>&1 | tee "$OUT/$op.txt"
  fi
done
if want hyper_connections; then
  step hyper_connections bench
  $py bench/hyper_connections/hc_bench.py --json "$OUT/hc.json" 2>&1 | tee "$OUT/hc.txt"
fi
if want compressor; then
  step compressor bench
  $py bench/compressor/compressor_bench.py ${COMPRESSOR_ARGS:-} --json "$OUT/compressor.json" 2>&1 | tee "$OUT/compressor.txt"
fi
