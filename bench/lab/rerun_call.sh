#!/usr/bin/env bash
# One device call after a GPU run's fixes: the fixed tests, sanitizer on the changed kernels, the
# step-error probe in parallel; then the attention-block bench (with the torch column) and the step
# bench with hooks.  Logs to $OUT (at most 8 files).
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -1
P="timeout ${T_S:-230} python3 -m pytest -q -p no:cacheprovider -rf -m gpu"
S="timeout 110 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x -m gpu"
($P tests/router/test_router_gpu.py -k grouped_direct_path >"$OUT/t_router.txt" 2>&1; echo "exit $?" >>"$OUT/t_router.txt") &
($P tests/compressor/test_compressor_gpu.py -k property tests/sparse_attention/test_sparse_attention_gpu.py -k "property or fp8" >"$OUT/t_comp_sa.txt" 2>&1; echo "exit $?" >>"$OUT/t_comp_sa.txt") &
($P tests/models >"$OUT/t_models.txt" 2>&1; echo "exit $?" >>"$OUT/t_models.txt") &
(timeout 200 python3 bench/lab/step_error.py >"$OUT/step_error.txt" 2>&1) &
($S tests/sparse_attention/test_sparse_attention_gpu.py -k fp8_pack 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}"
 $S tests/indexer/test_indexer_gpu.py -k "C512 or C7 or C1- or errors or e4m3" 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}") >"$OUT/san.txt" 2>&1 &
wait
for f in "$OUT"/*.txt; do echo "== $f"; grep -E "passed|failed|^FAILED|^exit|ERROR SUMMARY|seed" "$f" | tail -8; done
[ -n "${ATT:-1}" ] && timeout ${ATT_S:-170} python3 bench/models/attention_bench.py --batches 1 64 256 --contexts 4096 65536 1048576 --steps 5 >"$OUT/bench_att.txt" 2>&1
echo "== att exit $?"; cat "$OUT/bench_att.txt"
[ -n "${STEP:-1}" ] && timeout ${STEP_S:-120} python3 bench/models/step_bench.py --batches 1 64 256 --context 65536 --layers 4 --steps 5 --hooks >"$OUT/bench_step.txt" 2>&1
echo "== step exit $?"; grep -E "^B=|recorder|ratio" "$OUT/bench_step.txt"
[ -n "${SA:-1}" ] && timeout ${SA_S:-90} python3 bench/sparse_attention/sparse_attention_bench.py --shapes flash pro --rows 1 64 256 >"$OUT/bench_sa.txt" 2>&1
echo "== sa exit $?"; grep -E "^(bf16|fp8)|sdpa|torch_eager_per|error" "$OUT/bench_sa.txt"
