#!/usr/bin/env bash
# One device call: the GPU tests in SHARDS parallel pytest processes and compute-sanitizer on the
# newer ops at the same time, then the benchmarks one after another (nothing else on the card).
# Logs to $OUT: tests.txt (every shard's log), sanitizer.txt, bench_<name>.txt (at most 8 files come back).
#   TESTS_S=300 SHARDS=4 BENCH="sa hc" bash bench/gpu_call.sh        (GROUPS_ON=0: no tests)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
TESTS_S=${TESTS_S:-300}; BENCH=${BENCH:-"sa hc ix"}
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
P="python3 -m pytest -q -p no:cacheprovider -rf --durations=5"
# the GPU tests in SHARDS pytest processes (DS4KERN_TEST_SHARD=i/n, tests/conftest.py), logs g<i>.txt
SHARDS=${SHARDS:-6}
if [ "${GROUPS_ON:-1}" = 1 ]; then
  for i in $(seq 0 $((SHARDS - 1))); do
    ( DS4KERN_TEST_SHARD=$i/$SHARDS timeout "$TESTS_S" $P -m gpu ${TEST_PATHS:-tests} ${IGNORE:-} > "$OUT/g$i.txt" 2>&1
      echo "exit $?" >> "$OUT/g$i.txt" ) &
  done
fi
( S="compute-sanitizer --tool memcheck --error-exitcode 9 $P -x -m gpu"; T0=$SECONDS
  # each entry: "FILE -k EXPR" with '+' for the spaces of EXPR (EXTRA_SAN: more entries, same form)
  for t in "tests/topk/test_topk_gpu.py -k not+largest+and+not+property" \
           "tests/sparse_attention/test_sparse_attention_gpu.py -k N3-H8-K64+or+fp8_pack" \
           "tests/hyper_connections/test_hc_gpu.py -k B3-D4096" \
           "tests/indexer -k not+largest+and+not+property" \
           "tests/moe/test_moe_gpu.py -k not+large" \
           "tests/expert_mlp/test_grouped_linear.py -k not+1024" \
           "tests/norm/test_norm.py -k not+property" ${EXTRA_SAN:-}; do
    set -- $t; f=$1; k=${3:-}; k=${k//+/ }
    left=$((TESTS_S - (SECONDS - T0))); per=${SAN_S:-100}; [ $left -lt $per ] && per=$left
    echo "== sanitizer $f -k '$k' (limit ${per}s)"
    [ $per -lt 20 ] && { echo "exit skipped (no time left)"; continue; }
    timeout $per $S $f -k "$k" 2>&1 | tail -4; echo "exit ${PIPESTATUS[0]}"
  done > "$OUT/sanitizer.txt" 2>&1 ) &
wait
for f in "$OUT"/g*.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename "$f"): $(grep -E '[0-9]+ (passed|failed)' "$f" | tail -1) $(tail -1 "$f")"
  grep -E '^(FAILED|ERROR)' "$f" | head -8
  { echo "######## $(basename "$f")"; cat "$f"; } >> "$OUT/tests.txt" && rm "$f"  # one file back, not SHARDS
done
grep -E "^(== |exit|.*(passed|failed|ERROR SUMMARY))" "$OUT/sanitizer.txt"
for b in $BENCH; do
  case $b in
    sa) timeout 120 python3 bench/sparse_attention/sparse_attention_bench.py ;;
    hc) timeout 100 python3 bench/hyper_connections/hc_bench.py --repeat 30 --no-compile ;;
    ix) timeout 90 python3 bench/indexer/indexer_bench.py ;;
    em) timeout 120 python3 bench/expert_mlp/expert_mlp_bench.py ;;
    moe) timeout 60 python3 bench/moe/moe_bench.py ;;
    step) timeout 300 python3 bench/models/step_bench.py --batches 1 64 256 --context 65536 --layers 4 --steps 5 --hooks ;;
    att) timeout 300 python3 bench/models/attention_bench.py --batches 1 64 256 --contexts 4096 65536 1048576 ;;
    comp) timeout 300 python3 bench/models/torch_composite.py ;;
    scope) timeout 60 python3 bench/core/scope_overhead.py ;;
    *) eval "$b" ;;
  esac > "$OUT/bench_$b.txt" 2>&1; echo "== bench $b exit $?"; tail -30 "$OUT/bench_$b.txt"
done
