#!/usr/bin/env bash
# Device call: host cost of a router call on an old tree (.old, carried) and this one, interleaved
# (#22), hc tiled against the other variants at B = 128..512, and ncu counters of hc_pre tiled /
# grouped and topk radix / hist (the performance pages quote them).   run with carry [".old"]
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/ds4kern-cupy-router 2>&1 | tail -1
{ for side in new old new old; do
    if [ $side = old ]; then PYTHONPATH=$PWD/.old timeout 60 python3 bench/lab/host_profile.py --calls 20000
    else timeout 60 python3 bench/lab/host_profile.py --calls 20000; fi
  done
  timeout 90 python3 bench/lab/host_profile.py --calls 20000 --profile
  echo "== old profile"; PYTHONPATH=$PWD/.old timeout 90 python3 bench/lab/host_profile.py --calls 20000 --profile
} >"$OUT/host.txt" 2>&1
grep -E "host per call|getDevice|from" "$OUT/host.txt"
timeout 150 python3 bench/hyper_connections/hc_bench.py --tokens 128 256 512 --repeat 30 --no-compile \
  --variants auto tiled grouped split >"$OUT/bench_hc_mid.txt" 2>&1; echo "== hc exit $?"
grep -E "\| (128|256|512) \|" "$OUT/bench_hc_mid.txt" | grep -v "hc_post |"
M="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis"
timeout 120 ncu $M --kernel-name regex:'hc_pre' --launch-skip 0 --launch-count 12 \
  python3 bench/lab/profile_ops.py hc 4096 7168 tiled grouped >"$OUT/ncu_hc.txt" 2>&1; echo "== ncu hc exit $?"
timeout 120 ncu $M --kernel-name regex:'topk' --launch-skip 0 --launch-count 40 \
  python3 bench/lab/profile_ops.py topk 8 262144 512 radix hist >"$OUT/ncu_topk.txt" 2>&1; echo "== ncu topk exit $?"
grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occ" "$OUT/ncu_hc.txt" | head -60
