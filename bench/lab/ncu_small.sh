#!/usr/bin/env bash
# Device call: Nsight Compute on the two latency-bound misses: hc_pre at B = 1 (split, D = 4096,
# bf16) and topk_rows at R = 4, C = 8192, k = 512 (radix, one block per row).  Logs to $OUT.
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
M="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats --section SourceCounters"
timeout 100 ncu $M --kernel-name regex:'hc_pre' --launch-skip 2 --launch-count 1 \
  python3 bench/lab/profile_ops.py hc 1 4096 split >"$OUT/ncu_hc_b1.txt" 2>&1; echo "== hc exit $?"
timeout 100 ncu $M --kernel-name regex:'topk' --launch-skip 2 --launch-count 1 \
  python3 bench/lab/profile_ops.py topk 4 8192 512 radix >"$OUT/ncu_topk_small.txt" 2>&1; echo "== topk exit $?"
for f in "$OUT"/ncu_*.txt; do grep -E "^  [a-z_ ]*[a-z_]+.*\(|Duration|Compute \(SM\)|Memory Throughput +%|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp|No Eligible|Registers Per|Grid Size|Block Size" "$f" | awk '{$1=$1};1' | cut -c1-120; done
