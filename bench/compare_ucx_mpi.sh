#!/usr/bin/env bash
# UCX against MPI on this machine: `switchyard bench comm --op alltoall` under
# mpirun (backend mpi) and under `switchyard launch` (backend ucx), run in
# turn ROUNDS times (M U M U ...); prints the median busbw per size of each and
# their ratio, then the smallest ratio at 16-64 MiB against the target
# (UCX >= 1.0x MPI). INCONCLUSIVE when a side's runs spread by more than 25%
# at those sizes. Exits non-zero only when a run fails.
#
# usage: bench/compare_ucx_mpi.sh BUILD_DIR [NP]   (ROUNDS=5, SIZES="-b 1M -e 64M -f 4")
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 BUILD_DIR [NP]" >&2; exit 2; }
bin="$1/bin/switchyard"
np=${2:-2}
rounds=${ROUNDS:-5}
sizes=${SIZES:--b 1M -e 64M -f 4}
[[ -x "$bin" ]] || { echo "no $bin (build first)" >&2; exit 2; }
mpi_flags=(--oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && mpi_flags+=(--allow-run-as-root)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for ((r = 1; r <= rounds; ++r)); do
  echo "# round $r/$rounds" >&2
  # shellcheck disable=SC2086  # sizes is a word list
  OMPI_MCA_btl=self,vader mpirun -np "$np" "${mpi_flags[@]}" -x OMPI_MCA_btl "$bin" bench comm --backend mpi \
    --op alltoall $sizes -n 20 > "$tmp/mpi.$r" || { echo "mpi run $r failed" >&2; exit 1; }
  # shellcheck disable=SC2086
  "$bin" launch --nprocs "$np" -- "$bin" bench comm --op alltoall $sizes -n 20 | sed 's/^\[0\] //' > "$tmp/ucx.$r" ||
    { echo "ucx run $r failed" >&2; exit 1; }
done

# size and busbw (column 8) of every result line of every round, per side
collect() { cat "$tmp/$1".* | awk '$1 ~ /^[0-9]+$/ && NF >= 9 { print $1, $8 }'; }
stats() {  # stats SIDE: size median min max
  collect "$1" | sort -k1,1n -k2,2g | awk '
    { v[$1] = v[$1] " " $2 }
    END { for (s in v) { n = split(v[s], a, " "); printf "%s %s %s %s\n", s, a[int((n + 1) / 2)], a[1], a[n] } }' |
    sort -n
}
join <(stats mpi) <(stats ucx) | awk -v rounds="$rounds" -v np="$np" '
  BEGIN { printf "# alltoall busbw (GB/s), %d ranks on this machine, median of %d alternated runs\n", np, rounds
          printf "%12s %10s %10s %8s\n", "size(B)", "mpi", "ucx", "ucx/mpi"; worst = 1e9; noisy = 0 }
  { ratio = $5 / $2; printf "%12d %10.2f %10.2f %8.2f\n", $1, $2, $5, ratio
    if ($1 >= 16777216) { if (ratio < worst) { worst = ratio; at = $1 }
                          if ($4 / $3 > 1.25 || $7 / $6 > 1.25) noisy = 1 } }
  END { if (worst == 1e9) { print "no sizes >= 16 MiB measured"; exit }
        if (noisy) printf "INCONCLUSIVE: runs at >= 16 MiB spread by more than 25%% (min ratio %.2f at %d B)\n", worst, at
        else printf "min ucx/mpi at >= 16 MiB: %.2f at %d B (target >= 1.0): %s\n", worst, at, (worst >= 1.0 ? "met" : "NOT met") }'
