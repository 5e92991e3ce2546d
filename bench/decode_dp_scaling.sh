#!/usr/bin/env bash
# Data-parallel attention against one rank, on this machine: `switchyard bench
# decode --requests N` (all requests at once) under four configurations, run
# in turn ROUNDS times (A B C D A B C D ...) so a drifting machine hits all
# alike; prints each one's median total tokens/s with its spread, and the
# medians' ratios:
#   1x1      one rank, one GEMM thread            (the baseline)
#   1x2      one rank, two GEMM threads
#   dp2-thr  two thread-ranks (one process), one thread each, --attention dp
#   dp2-mpi  two MPI ranks, one thread each, --attention dp
# The verdict is INCONCLUSIVE when the baseline's own runs spread by more than
# 25% (max / min), else the ratios against the targets (dp2 >= 1.6x 1x1,
# >= 1.0x 1x2) are reported as met or not. Exits non-zero only when a run
# fails or prints no result.
#
# usage: bench/decode_dp_scaling.sh BUILD_DIR [--csv FILE]
# Environment (optional): ROUNDS=5, REQUESTS=64, MODEL=examples/tiny_lm/base,
#   MPIRUN=mpirun, EXTRA="..." (more bench decode flags, e.g. --rate 200).
set -euo pipefail

usage() { echo "usage: $0 BUILD_DIR [--csv FILE]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
build=$1
shift
csv=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --csv) [[ $# -ge 2 ]] || usage; csv=$2; shift 2 ;;
    *) usage ;;
  esac
done
bin="$build/bin/switchyard"
[[ -x "$bin" ]] || { echo "no $bin (build first)" >&2; exit 2; }
rounds=${ROUNDS:-5}
requests=${REQUESTS:-64}
model=${MODEL:-examples/tiny_lm/base}
mpirun=${MPIRUN:-mpirun}
extra=${EXTRA:-}
mpi_flags=(--oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && mpi_flags+=(--allow-run-as-root)
# A spinning OpenMP runtime collapses whichever configuration shares a core.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

names=(1x1 1x2 dp2-thr dp2-mpi)
run_one() {
  local args=(bench decode --model "$model" --requests "$requests" $extra)
  case "$1" in
    1x1) "$bin" "${args[@]}" --threads 1 ;;
    1x2) "$bin" "${args[@]}" --threads 2 ;;
    dp2-thr) "$bin" "${args[@]}" --ranks 2 --attention dp --threads 1 ;;
    dp2-mpi) OMPI_MCA_btl=self,vader "$mpirun" -np 2 "${mpi_flags[@]}" -x OMP_WAIT_POLICY -x OMPI_MCA_btl \
               "$bin" "${args[@]}" --attention dp --threads 1 ;;
  esac
}

declare -A results
for ((r = 1; r <= rounds; ++r)); do
  for n in "${names[@]}"; do
    out=$(run_one "$n" 2>/dev/null) || { echo "$n: the run failed" >&2; exit 1; }
    tps=$(sed -n 's/^total tokens\/s: \([0-9.]*\).*/\1/p' <<<"$out")
    ttft=$(sed -n 's/^TTFT ms: median \([0-9.]*\).*/\1/p' <<<"$out")
    tpot=$(sed -n 's/^TPOT ms: median \([0-9.]*\).*/\1/p' <<<"$out")
    [[ -n "$tps" ]] || { echo "$n: no 'total tokens/s' line in:"; echo "$out"; exit 1; } >&2
    results[$n]+="$tps $ttft $tpot;"
    echo "round $r/$rounds  $n: $tps tokens/s (TTFT median $ttft ms, TPOT median $tpot ms)" >&2
  done
done

# median / min / max of field F (1 tokens/s, 2 TTFT, 3 TPOT) of one configuration
stat() {
  tr ';' '\n' <<<"${results[$1]}" | awk -v f="$2" 'NF { print $f }' | sort -g |
    awk '{ v[NR] = $1 } END { printf "%s %s %s", v[int((NR + 1) / 2)], v[1], v[NR] }'
}

echo "# bench decode --requests $requests ($model), $rounds alternated rounds, OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
printf "%-8s %12s %12s %12s %12s %12s %10s\n" config "tokens/s" min max "TTFT ms" "TPOT ms" "vs 1x1"
read -r base base_min base_max <<<"$(stat 1x1 1)"
[[ -n "$csv" ]] && echo "config,tokens_per_s_median,min,max,ttft_ms_median,tpot_ms_median,ratio_vs_1x1" > "$csv"
declare -A median
for n in "${names[@]}"; do
  read -r m lo hi <<<"$(stat "$n" 1)"
  read -r ttft _ _ <<<"$(stat "$n" 2)"
  read -r tpot _ _ <<<"$(stat "$n" 3)"
  median[$n]=$m
  ratio=$(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
  printf "%-8s %12s %12s %12s %12s %12s %10s\n" "$n" "$m" "$lo" "$hi" "$ttft" "$tpot" "$ratio"
  [[ -n "$csv" ]] && echo "$n,$m,$lo,$hi,$ttft,$tpot,$ratio" >> "$csv"
done
spread=$(awk -v a="$base_max" -v b="$base_min" 'BEGIN { printf "%.2f", a / b }')
verdict() {  # verdict NAME VS TARGET
  awk -v a="${median[$1]}" -v b="${median[$2]}" -v t="$3" -v name="$1" -v vs="$2" 'BEGIN {
    r = a / b; printf "%s / %s = %.2f (target >= %.1f): %s\n", name, vs, r, t, (r >= t ? "met" : "NOT met") }'
}
if [[ "$extra" == *--rate* ]]; then
  echo "arrivals paced by --rate: tokens/s is bounded by the arrival rate, so no throughput verdict (compare TTFT and TPOT)"
elif awk -v s="$spread" 'BEGIN { exit !(s > 1.25) }'; then
  echo "INCONCLUSIVE: the baseline's runs spread by ${spread}x (max / min > 1.25); the machine was too noisy"
else
  echo "baseline spread ${spread}x (max / min)"
  for n in dp2-thr dp2-mpi; do
    verdict "$n" 1x1 1.6
    verdict "$n" 1x2 1.0
  done
fi
