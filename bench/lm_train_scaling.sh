#!/usr/bin/env bash
# The moe-lm-train step on 1, 2 and 4 thread-ranks of this machine, fp32 and
# bf16 experts: tokens/s and step time over the GEMM floor (the busiest rank's
# GEMM FLOPs at its measured concurrent rate, which the job prints). Runs
# alternate (every configuration once per round, ROUNDS rounds); the table
# gives each configuration's median and spread over the rounds, and says
# INCONCLUSIVE for one whose rounds spread by more than 15%.
# Usage: bench/lm_train_scaling.sh [OUT_DIR]  (writes OUT_DIR/runs.csv and prints the table)
set -euo pipefail
out=${1:-bench-results/lm-train}
mkdir -p "$out"
sy=${SWITCHYARD:-build/bin/switchyard}
rounds=${ROUNDS:-3}
steps=${STEPS:-60}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
csv="$out/runs.csv"
ckpt=$(mktemp -d)  # the runs' checkpoints: scratch, not results
trap 'rm -rf "$ckpt"' EXIT
echo "round,ranks,dtype,tokens_per_s,step_s,floor_ratio,heldout_ratio" > "$csv"
for ((r = 1; r <= rounds; ++r)); do
  for ranks in 1 2 4; do
    for dtype in f32 bf16; do
      echo "[lm_train_scaling] round $r/$rounds: $ranks ranks, $dtype" >&2
      log=$("$sy" run --config configs/quickstart.yaml --set comm.ranks="$ranks" --set train.dtype="$dtype" \
        --set train.steps="$steps" --set lm.probe_plans=0 --set train.checkpoint="$ckpt/$ranks-$dtype")
      line=$(grep '^# [0-9]* steps in' <<< "$log")
      floor=$(grep '^# GEMM floor' <<< "$log" | sed 's/.*step time \/ floor = \([0-9.]*\)/\1/')
      tps=$(sed 's/.* s\/step, \([0-9]*\) tokens\/s.*/\1/' <<< "$line")
      step=$(sed 's/.*: \([0-9.]*\) s\/step.*/\1/' <<< "$line")
      held=$(sed 's/.* = \([0-9.]*\) x unigram/\1/' <<< "$line")
      echo "$r,$ranks,$dtype,$tps,$step,$floor,$held" >> "$csv"
    done
  done
done
/usr/bin/python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'ranks':>5} {'dtype':>5} {'tokens/s':>9} {'step s':>8} {'step/floor':>10} {'spread':>7}")
for ranks in ("1", "2", "4"):
    for dtype in ("f32", "bf16"):
        sel = [r for r in rows if r["ranks"] == ranks and r["dtype"] == dtype]
        steps = [float(r["step_s"]) for r in sel]
        spread = (max(steps) - min(steps)) / statistics.median(steps)
        flag = "  INCONCLUSIVE (rounds spread > 15%)" if spread > 0.15 else ""
        print(f"{ranks:>5} {dtype:>5} {statistics.median(float(r['tokens_per_s']) for r in sel):>9.0f} "
              f"{statistics.median(steps):>8.4f} {statistics.median(float(r['floor_ratio']) for r in sel):>10.2f} "
              f"{spread:>6.1%}{flag}")
PY
