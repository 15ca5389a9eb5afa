#!/usr/bin/env bash
# Lab: router and compressor benchmarks of an older tree and of this one, in the same device
# call (same machine, same warm GPU), to show a change did not slow the kernels.
#   OLD=/path/to/old/checkout bash bench/lab/ab_old_new.sh      (logs to $OUT or ./gpu_out)
# The old tree is run from its own folder with PYTHONPATH pointing at it (its bench scripts
# sit at bench/*.py in trees before the per-op layout).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TOK=${TOK:-"128 4096 16384 65536 131072"}
old_router=$OLD/bench/router_bench.py; [ -f "$old_router" ] || old_router=$OLD/bench/router/router_bench.py
old_comp=$OLD/bench/compressor_bench.py; [ -f "$old_comp" ] || old_comp=$OLD/bench/compressor/compressor_bench.py
for side in new old; do
  if [ $side = old ]; then pp=$OLD; rb=$old_router; cb=$old_comp; else pp=$PWD; rb=bench/router/router_bench.py; cb=bench/compressor/compressor_bench.py; fi
  echo "=== $side router"
  PYTHONPATH=$pp python3 $rb --configs flash v3 --tokens $TOK --variants rows screened grouped --repeat 100 --json "$OUT/router_$side.json" 2>&1 | tail -60 > "$OUT/router_$side.txt"
  echo "=== $side compressor"
  PYTHONPATH=$pp python3 $cb --batches 1 8 64 256 --repeat 30 --json "$OUT/comp_$side.json" 2>&1 | tail -40 > "$OUT/comp_$side.txt"
done
