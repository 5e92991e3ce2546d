#!/usr/bin/env bash
# Issue 4's measurement: for emulated h100-nvlink-ib clusters of 8..64 ranks
# and six MoE configurations, every fixed plan against --strategy auto (bench
# moe --sweep, timing-only emulation: virtual step times), then the same
# sweep on this machine's 2 real thread-ranks in wall time.
# Usage: bench/plan_sweep.sh [OUT_DIR]   (writes OUT_DIR/sweep-*.txt and summary.txt)
set -euo pipefail
out=${1:-bench-results/plan-sweep}
mkdir -p "$out"
sy=${SWITCHYARD:-build/bin/switchyard}
# name: model_dim hidden experts-per-rank(-S: S ranks per expert) tokens/rank capacity-factor top-k
configs=(
  "c1-base:1024 4096 1 2048 1.0 2"
  "c2-wide:2048 8192 2 2048 1.0 2"
  "c3-shared2:1024 4096 -2 2048 1.25 2"
  "c4-big-experts:4096 16384 -4 1024 1.0 2"
  "c5-small-tokens:512 2048 4 256 2.0 2"
  "c6-token-heavy:1024 1024 1 8192 1.0 1"
)
summary="$out/summary.txt"
echo "# config ranks best_fixed_plan best_s worst_s worst/best auto_s auto/best" > "$summary"
for ranks in 8 16 32 64; do
  for entry in "${configs[@]}"; do
    name=${entry%%:*}; read -r M H L T CF K <<< "${entry#*:}"
    if (( L < 0 && ranks % -L != 0 )); then continue; fi
    f="$out/sweep-$name-$ranks.txt"
    echo "[plan_sweep] $name on $ranks emulated ranks" >&2
    if ! "$sy" bench moe --ranks "$ranks" --batch_size 1 --num_tokens "$T" --model_dim "$M" --hidden_size "$H" \
      --num_local_experts "$L" --capacity_factor "$CF" --top "$K" --num_steps 1 --sweep \
      --emulate h100-nvlink-ib --timing_only > "$f" 2>&1; then
      echo "$name $ranks FAILED (see $f)" >> "$summary"
      continue
    fi
    awk -v name="$name" -v ranks="$ranks" '
      /^#   r = / { t = $14 + 0; line = $0; sub(/^#   /, "", line); sub(/ +[0-9.]+ sec.*/, "", line);
                  if (best == "" || t < best) { best = t; bestp = line } if (t > worst) worst = t }
      /^#   auto/ { auto = $8 + 0 }
      END { printf "%s %d \"%s\" %.6f %.6f %.3f %.6f %.3f\n", name, ranks, bestp, best, worst, worst / best, auto, auto / best }
    ' "$f" >> "$summary"
  done
done
# This machine: 2 real thread-ranks, wall time, smaller shapes (real GEMMs).
for entry in "r1:512 1024 2 1024 1.0 2" "r2:512 1024 -2 1024 1.0 1"; do
  name=${entry%%:*}; read -r M H L T CF K <<< "${entry#*:}"
  f="$out/sweep-real-$name.txt"
  echo "[plan_sweep] $name on 2 real ranks" >&2
  "$sy" bench moe --ranks 2 --batch_size 1 --num_tokens "$T" --model_dim "$M" --hidden_size "$H" \
    --num_local_experts "$L" --capacity_factor "$CF" --top "$K" --num_steps 5 --sweep > "$f" 2>&1
done
cat "$summary"
