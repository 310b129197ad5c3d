#!/usr/bin/env bash
# Soak test (not part of CI): a chunked PPO run with NVMe offload under tight device and host
# budgets for MINUTES minutes, sampling the process's resident memory, open file descriptors and
# NVMe directory size once a minute. Prints one JSON line per sample and a summary; exits non-zero
# if the run failed before the time was up or an error appeared in its log.
# Usage: scripts/soak.sh NVME_DIR [MINUTES=30] [OUT=runs/soak]
set -euo pipefail
nvme=${1:?usage: scripts/soak.sh NVME_DIR [MINUTES] [OUT]}; minutes=${2:-30}; out=${3:-runs/soak}
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="$repo/target/release/stowage"
[ -x "$bin" ] || (cd "$repo" && cargo build --release -p stowage-harness)
mkdir -p "$out" "$nvme"
# SFT and reward model first (short), then PPO with more iterations than the time allows.
"$bin" pipeline --task sentiment --strategy chunked --sft-steps 200 --rm-steps 200 --ppo-steps 0 \
  --pairs-prompts 256 --quiet --out "$out/prep" >/dev/null
"$bin" ppo --task sentiment --strategy chunked --actor "$out/prep/sft/checkpoint" \
  --reward-model "$out/prep/rm/checkpoint" --steps 1000000 --eval-every 0 \
  --device-budget 12M --host-budget 12M --nvme-dir "$nvme" --quiet --out "$out/ppo" 2>"$out/ppo.log" &
pid=$!
samples="$out/samples.jsonl"; : >"$samples"
end=$(( $(date +%s) + minutes * 60 ))
while [ "$(date +%s)" -lt "$end" ] && kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$pid/status" 2>/dev/null || echo 0)
  fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
  disk=$(du -sb "$nvme" | cut -f1)
  iters=$(grep -c '"reward_mean"' "$out/ppo/metrics.jsonl" 2>/dev/null || echo 0)
  echo "{\"t_s\": $(( minutes * 60 - (end - $(date +%s)) )), \"rss_bytes\": $rss, \"open_fds\": $fds, \"nvme_bytes\": $disk, \"iterations\": $iters}" | tee -a "$samples"
  sleep 60
done
alive=0; kill -0 "$pid" 2>/dev/null && alive=1
kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
errors=$(grep -ci "error" "$out/ppo.log" || true)
python3 - "$samples" "$alive" "$errors" <<'PY'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1])]
alive, errors = sys.argv[2] == "1", int(sys.argv[3])
warm = s[2:] if len(s) > 3 else s
rss = [x["rss_bytes"] for x in warm]; fds = [x["open_fds"] for x in warm]
print(json.dumps({"samples": len(s), "iterations": s[-1]["iterations"] if s else 0,
  "rss_after_warmup_min_max": [min(rss), max(rss)] if rss else None,
  "open_fds_after_warmup_min_max": [min(fds), max(fds)] if fds else None,
  "ran_to_the_end": alive, "error_lines": errors}))
sys.exit(0 if alive and errors == 0 else 1)
PY
