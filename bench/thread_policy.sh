#!/usr/bin/env bash
# Does a busy neighbour collapse Switchyard's steps? The MoE-layer training
# job (configs/moe-regression.yaml) on one rank (two GEMM threads) and a `bench moe` step, each run
#   quiet     the default environment, nothing else running
#   loaded    the default environment beside a process that keeps one core busy
#   spinning  loaded, with OMP_WAIT_POLICY=active (OpenMP's spinning policy,
#             which the switchyard command no longer starts with by default)
# in turn ROUNDS times (quiet loaded spinning quiet ...), then the median step
# time of each and the ratios loaded / quiet (target <= 1.5) and spinning /
# quiet. INCONCLUSIVE when the quiet runs themselves spread by more than 25%.
#
# usage: bench/thread_policy.sh BUILD_DIR     (ROUNDS=5 by default)
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
bin="$1/bin/switchyard"
[[ -x "$bin" ]] || { echo "no $bin (build first)" >&2; exit 2; }
rounds=${ROUNDS:-5}
cd "$(dirname "$0")/.."
# The user's own policy would decide the "default" runs: measure without one.
unset OMP_WAIT_POLICY GOMP_SPINCOUNT

job() {  # step seconds of the MoE-layer job on one rank
  "$@" "$bin" run --config configs/moe-regression.yaml --set comm.ranks=1 --set train.steps=60 |
    sed -n 's/^#   step time *\([0-9.e-]*\) s$/\1/p'
}
moe() {  # step seconds of bench moe on one rank
  "$@" "$bin" bench moe --ranks 1 --num_steps 8 --batch_size 2 --num_tokens 512 --model_dim 512 --hidden_size 1024 |
    sed -n 's/^\[Summary\] Average synchronized step_time = \([0-9.e-]*\) sec.*/\1/p'
}
neighbour=""
start_neighbour() { sh -c 'while :; do :; done' & neighbour=$!; sleep 0.2; }
stop_neighbour() { [[ -n "$neighbour" ]] && kill "$neighbour" 2>/dev/null; wait "$neighbour" 2>/dev/null || true; neighbour=""; }
trap stop_neighbour EXIT

declare -A runs
for ((r = 1; r <= rounds; ++r)); do
  for bench in job moe; do
    q=$($bench env); start_neighbour
    l=$($bench env); s=$($bench env OMP_WAIT_POLICY=active); stop_neighbour
    for v in "$q" "$l" "$s"; do [[ -n "$v" ]] || { echo "$bench: a run printed no step time" >&2; exit 1; }; done
    runs[$bench.quiet]+="$q "; runs[$bench.loaded]+="$l "; runs[$bench.spinning]+="$s "
    echo "round $r/$rounds $bench: quiet $q s, loaded $l s, spinning $s s" >&2
  done
done

median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
spread() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", v[NR] / v[1] }'; }
echo "# step time beside a CPU-burning neighbour, $rounds alternated rounds, medians"
printf "%-6s %12s %12s %12s %14s %16s %8s\n" bench "quiet s" "loaded s" "spinning s" "loaded/quiet" "spinning/quiet" verdict
for bench in job moe; do
  q=$(median "${runs[$bench.quiet]}"); l=$(median "${runs[$bench.loaded]}"); s=$(median "${runs[$bench.spinning]}")
  sp=$(spread "${runs[$bench.quiet]}")
  lr=$(awk -v a="$l" -v b="$q" 'BEGIN { printf "%.2f", a / b }'); srt=$(awk -v a="$s" -v b="$q" 'BEGIN { printf "%.2f", a / b }')
  if awk -v s="$sp" 'BEGIN { exit !(s > 1.25) }'; then
    verdict="INCONCLUSIVE (quiet runs spread ${sp}x)"
  elif awk -v r="$lr" 'BEGIN { exit !(r <= 1.5) }'; then verdict=met; else verdict="NOT met"; fi
  printf "%-6s %12s %12s %12s %14s %16s %s\n" "$bench" "$q" "$l" "$s" "$lr" "$srt" "$verdict"
done
