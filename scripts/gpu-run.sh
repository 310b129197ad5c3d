#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target/gpu-kit carried over (see
# scripts/gpu-kit.sh). Writes logs and the tier benchmark's JSON under $OUT.
set -uo pipefail
kit=target/gpu-kit
out=${OUT:-/tmp/stowage-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
status=0
for t in "$kit"/test-*; do
  name=$(basename "$t")
  STOWAGE_TEST_DIR=/tmp/stowage-tests "$t" --nocapture > "$out/$name.log" 2>&1 || status=1
  tail -n 3 "$out/$name.log"
done
"$kit/bench-tiers" --dir /tmp/stowage-bench --json "$out/tiers.json" --mib 1024 > "$out/bench-tiers.log" 2>&1 || status=1
tail -n 30 "$out/bench-tiers.log"
exit $status
