#!/usr/bin/env bash
# Compares `switchyard bench comm --backend mpi --op alltoall` against the bare
# MPI_Alltoall baseline (bench/mpi_alltoall_baseline.cpp) on the same machine,
# in one invocation: the two runs alternate ROUNDS times (A B A B A B) so that
# drifting machine state hits both alike, and the median busbw per size is compared.
#
# usage: bench/compare_alltoall.sh BUILD_DIR [NP] [--csv FILE] [--from DIR]
#   NP defaults to 2. Prints size, baseline busbw, switchyard busbw (medians,
#   GB/s) and their ratio, then the minimum ratio over sizes >= 16 MiB and
#   PASS (>= 0.9) or FAIL, or INCONCLUSIVE when the baseline cannot be
#   trusted at those sizes: its median below 0.05 GB/s (a broken or starved
#   run), its rounds spread by more than 1.5x (max / min: a noisy machine), or
#   a ratio above 2 (nothing built on MPI_Alltoall beats it twice over).
#   Exits 0 either way; non-zero only when a run failed (non-zero exit, no
#   result lines, or a non-zero #wrong column).
#   --from DIR: no runs; read DIR/baseline.N.txt and DIR/switchyard.N.txt
#   (kept outputs, or a test's).
# Environment (optional):
#   ROUNDS=3            runs of each side
#   SIZES="-b 64K -e 64M -f 2"
#   MPIRUN=mpirun       launcher
#   RUN_TIMEOUT=600     seconds per run
#   BASELINE_CMD=...    default: BUILD_DIR/bin/mpi_alltoall_baseline
#   SWITCHYARD_CMD=...  default: BUILD_DIR/bin/switchyard bench comm --backend mpi --op alltoall
#                       (e.g. set it to the baseline to test this script)
set -euo pipefail

usage() { echo "usage: $0 BUILD_DIR [NP] [--csv FILE]" >&2; exit 2; }

csv=""
from=""
pos=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --csv) [[ $# -ge 2 ]] || usage; csv="$2"; shift 2 ;;
    --csv=*) csv="${1#--csv=}"; shift ;;
    --from) [[ $# -ge 2 ]] || usage; from="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) pos+=("$1"); shift ;;
  esac
done
[[ ${#pos[@]} -ge 1 && ${#pos[@]} -le 2 ]] || usage
build="${pos[0]}"
np="${pos[1]:-2}"
[[ "$np" =~ ^[0-9]+$ && "$np" -ge 1 ]] || { echo "NP must be a positive integer, got '$np'" >&2; exit 2; }

rounds="${ROUNDS:-3}"
sizes="${SIZES:--b 64K -e 64M -f 2}"
mpirun_bin="${MPIRUN:-mpirun}"
run_timeout="${RUN_TIMEOUT:-600}"
baseline_cmd="${BASELINE_CMD:-$build/bin/mpi_alltoall_baseline}"
switchyard_cmd="${SWITCHYARD_CMD:-$build/bin/switchyard bench comm --backend mpi --op alltoall}"

if [[ -z "$from" ]]; then
  for cmd in "$baseline_cmd" "$switchyard_cmd"; do
    exe="${cmd%% *}"
    [[ -x "$exe" ]] || { echo "not an executable: $exe" >&2; exit 1; }
  done
fi

launcher=("$mpirun_bin" -np "$np" --oversubscribe --bind-to none)
if [[ "$(id -u)" -eq 0 ]]; then launcher+=(--allow-run-as-root); fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# run ROLE ROUND CMD: runs one side, keeps its output in $tmp/ROLE.ROUND.txt.
run() {
  local role="$1" round="$2" cmd="$3" out="$tmp/$1.$2.txt"
  echo "# [$round/$rounds] $role: ${launcher[*]} $cmd $sizes" >&2
  # shellcheck disable=SC2086  # cmd and sizes are word lists on purpose
  if ! timeout "$run_timeout" "${launcher[@]}" $cmd $sizes >"$out" 2>&1; then
    echo "error: $role run $round failed; last lines:" >&2
    tail -n 30 "$out" >&2
    exit 1
  fi
  # Result lines: first field an integer; busbw is column 8, #wrong column 9.
  if ! awk '$1 ~ /^[0-9]+$/ && NF >= 8 { n++ } END { exit n > 0 ? 0 : 1 }' "$out"; then
    echo "error: $role run $round printed no result lines; output:" >&2
    tail -n 30 "$out" >&2
    exit 1
  fi
  local wrong
  wrong="$(awk '$1 ~ /^[0-9]+$/ && NF >= 9 && $9 ~ /^[0-9]+$/ && $9 != 0 { printf "%s(%s) ", $1, $9 }' "$out")"
  if [[ -n "$wrong" ]]; then
    echo "error: $role run $round reported wrong results at size(#wrong): $wrong" >&2
    exit 1
  fi
}

if [[ -n "$from" ]]; then
  cp "$from"/baseline.*.txt "$from"/switchyard.*.txt "$tmp"/
  rounds=$(ls "$tmp"/baseline.*.txt | wc -l)
fi
for ((r = 1; r <= rounds && ${#from} == 0; r++)); do
  run baseline "$r" "$baseline_cmd"
  run switchyard "$r" "$switchyard_cmd"
done

# Median per (role, size) over the rounds; table; min ratio over sizes >= 16 MiB.
awk -v np="$np" -v rounds="$rounds" -v csv="$csv" -v big=16777216 -v threshold=0.9 '
  function median(list,    v, n, i, j, t) {
    n = split(list, v, " ")
    for (i = 2; i <= n; i++) { t = v[i] + 0; for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  FNR == 1 { role = FILENAME; sub(/.*\//, "", role); sub(/\..*/, "", role) }
  $1 ~ /^[0-9]+$/ && NF >= 8 {
    size = $1 + 0
    vals[role, size] = vals[role, size] " " $8
    v = $8 + 0
    if (!((role, size) in lo) || v < lo[role, size]) lo[role, size] = v
    if (!((role, size) in hi) || v > hi[role, size]) hi[role, size] = v
    if (!(size in seen)) { seen[size] = 1; sizes[++nsizes] = size }
  }
  END {
    # sort sizes ascending
    for (i = 2; i <= nsizes; i++) { t = sizes[i]; for (j = i - 1; j >= 1 && sizes[j] > t; j--) sizes[j + 1] = sizes[j]; sizes[j + 1] = t }
    printf "# alltoall busbw (GB/s), np=%d, median of %d alternated runs per side\n", np, rounds
    printf "# %10s  %10s  %10s  %7s\n", "size(B)", "baseline", "switchyard", "ratio"
    if (csv != "") print "size_bytes,baseline_busbw_gbps,switchyard_busbw_gbps,ratio" > csv
    minratio = -1; minsize = 0
    for (i = 1; i <= nsizes; i++) {
      s = sizes[i]
      hb = ((("baseline", s) in vals)); hs = ((("switchyard", s) in vals))
      b = hb ? median(vals["baseline", s]) : 0
      y = hs ? median(vals["switchyard", s]) : 0
      if (hb && hs && b > 0) {
        ratio = y / b
        printf "%12d  %10.2f  %10.2f  %7.3f\n", s, b, y, ratio
        if (csv != "") printf "%d,%.4f,%.4f,%.4f\n", s, b, y, ratio > csv
        if (s >= big && (minratio < 0 || ratio < minratio)) { minratio = ratio; minsize = s }
        if (s >= big && doubt == "") {
          if (b < 0.05) doubt = sprintf("baseline %.3f GB/s at %d B is below 0.05: a broken or starved run", b, s)
          else if (lo["baseline", s] > 0 && hi["baseline", s] / lo["baseline", s] > 1.5)
            doubt = sprintf("baseline rounds at %d B spread %.2fx (max/min > 1.5): too noisy", s, hi["baseline", s] / lo["baseline", s])
          else if (ratio > 2) doubt = sprintf("ratio %.2f at %d B: nothing on MPI_Alltoall beats it twice over", ratio, s)
        }
      } else {
        if (s >= big && hb && hs && b <= 0 && doubt == "") doubt = sprintf("baseline 0 GB/s at %d B: a broken run", s)
        printf "%12d  %10s  %10s  %7s\n", s, hb ? sprintf("%.2f", b) : "-", hs ? sprintf("%.2f", y) : "-", "-"
        if (csv != "") printf "%d,%s,%s,\n", s, hb ? sprintf("%.4f", b) : "", hs ? sprintf("%.4f", y) : "" > csv
      }
    }
    if (minratio < 0)
      printf "# min ratio (size >= 16 MiB): n/a (no size >= 16 MiB in both) -> FAIL (threshold %.2f)\n", threshold
    else if (doubt != "")
      printf "# min ratio (size >= 16 MiB): %.3f at %d B -> INCONCLUSIVE: %s\n", minratio, minsize, doubt
    else
      printf "# min ratio (size >= 16 MiB): %.3f at %d B -> %s (threshold %.2f)\n", minratio, minsize,
             (minratio >= threshold ? "PASS" : "FAIL"), threshold
  }
' "$tmp"/baseline.*.txt "$tmp"/switchyard.*.txt
if [[ -n "$csv" ]]; then echo "# wrote $csv" >&2; fi
