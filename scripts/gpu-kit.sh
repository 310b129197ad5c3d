#!/usr/bin/env bash
# Builds, on this machine, what the GPU machine runs (it has no Rust toolchain): the memory
# crate's test binaries and the tier benchmark, stripped, in target/gpu-kit. Carry that folder
# to the GPU machine and run scripts/gpu-run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=target/gpu-kit
rm -rf "$kit" && mkdir -p "$kit"
exe() { python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' | tail -n 1; }
for t in cuda moves faults manager optim_stream; do
  cp "$(cargo test --release -p stowage-memory --test "$t" --no-run --message-format=json 2>/dev/null | exe)" "$kit/test-$t"
done
cp "$(cargo bench -p stowage-benches --bench tiers --no-run --message-format=json 2>/dev/null | exe)" "$kit/bench-tiers"
strip "$kit"/*
du -sh "$kit"
