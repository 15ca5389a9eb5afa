#!/usr/bin/env bash
# One device call: GPU tests in four parallel groups and compute-sanitizer on the newer ops at
# the same time, then the benchmarks one after another (nothing else on the card).  Logs to $OUT.
#   TESTS_S=300 BENCH="sa hc ix" bash bench/gpu_call.sh
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
TESTS_S=${TESTS_S:-300}; BENCH=${BENCH:-"sa hc ix"}
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
P="python3 -m pytest -q -p no:cacheprovider -rf --durations=5"
run_group() { local name=$1; shift; ( timeout "$TESTS_S" $P -m gpu "$@" > "$OUT/$name.txt" 2>&1; echo "exit $?" >> "$OUT/$name.txt" ) & }
if [ "${GROUPS_ON:-1}" = 1 ]; then
run_group g1_router tests/router tests/router_te tests/router_hash
run_group g2_comp tests/compressor tests/replay tests/locality tests/core tests/moe tests/expert_mlp
run_group g3_sa_hc tests/sparse_attention tests/hyper_connections
run_group g4_ix_models tests/indexer tests/topk tests/models ${EXTRA_TESTS:-} ${IGNORE:-}
fi
( S="timeout $((TESTS_S / 4)) compute-sanitizer --tool memcheck --error-exitcode 9 $P -x -m gpu"
  # each entry: "FILE -k EXPR" with '+' for the spaces of EXPR (EXTRA_SAN: more entries, same form)
  for t in "tests/topk/test_topk_gpu.py -k not+largest+and+not+property" \
           "tests/sparse_attention/test_sparse_attention_gpu.py -k N3-H8-K64+or+fp8_pack" \
           "tests/hyper_connections/test_hc_gpu.py -k B3-D4096" \
           "tests/indexer -k not+largest+and+not+property" ${EXTRA_SAN:-}; do
    set -- $t; f=$1; k=${3:-}; k=${k//+/ }
    echo "== sanitizer $f -k '$k'"; $S $f -k "$k" 2>&1 | tail -4; echo "exit ${PIPESTATUS[0]}"
  done > "$OUT/sanitizer.txt" 2>&1 ) &
wait
for g in g1_router g2_comp g3_sa_hc g4_ix_models; do
  [ -f "$OUT/$g.txt" ] && { echo "== $g: $(grep -E '[0-9]+ (passed|failed)' "$OUT/$g.txt" | tail -1) $(tail -1 "$OUT/$g.txt")"
  grep -E '^(FAILED|ERROR)' "$OUT/$g.txt" | head -8; }
done
grep -E "^(== |exit|.*(passed|failed|ERROR SUMMARY))" "$OUT/sanitizer.txt"
for b in $BENCH; do
  case $b in
    sa) timeout 120 python3 bench/sparse_attention/sparse_attention_bench.py ;;
    hc) timeout 100 python3 bench/hyper_connections/hc_bench.py --repeat 30 --no-compile ;;
    ix) timeout 90 python3 bench/indexer/indexer_bench.py ;;
    em) timeout 120 python3 bench/expert_mlp/expert_mlp_bench.py ;;
    moe) timeout 60 python3 bench/moe/moe_bench.py ;;
    *) eval "$b" ;;
  esac > "$OUT/bench_$b.txt" 2>&1; echo "== bench $b exit $?"; tail -30 "$OUT/bench_$b.txt"
done
