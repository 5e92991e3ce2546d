#!/usr/bin/env bash
# bench/compare_alltoall.sh judges kept outputs (--from): a sane baseline gives
# PASS; a baseline that read ~0 GB/s, or whose rounds spread 4x, gives
# INCONCLUSIVE, never PASS (it once printed PASS at 464x over a 0.00 GB/s baseline).
# usage: compare_alltoall_guard.sh SOURCE_DIR
set -euo pipefail
src=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# bench comm's result columns: size count type redop root time algbw busbw #wrong
write() {  # DIR ROLE ROUND BUSBW
  mkdir -p "$1"
  printf '%s\n' "# size count type redop root time algbw busbw #wrong" \
    "  1048576  262144 float none -1 500.0 2.10 1.05 0" "16777216 4194304 float none -1 4000.0 4.19 $4 0" > "$1/$2.$3.txt"
}
judge() { bash "$src/bench/compare_alltoall.sh" unused 2 --from "$1" 2>/dev/null | tail -1; }
for r in 1 2 3; do write "$tmp/sane" baseline $r 4.0; write "$tmp/sane" switchyard $r 3.8; done
for r in 1 2 3; do write "$tmp/broken" baseline $r 0.003; write "$tmp/broken" switchyard $r 1.4; done
write "$tmp/noisy" baseline 1 4.0; write "$tmp/noisy" baseline 2 1.0; write "$tmp/noisy" baseline 3 4.0
for r in 1 2 3; do write "$tmp/noisy" switchyard $r 3.8; done
sane=$(judge "$tmp/sane"); broken=$(judge "$tmp/broken"); noisy=$(judge "$tmp/noisy")
echo "sane:   $sane"; echo "broken: $broken"; echo "noisy:  $noisy"
[[ $sane == *"-> PASS"* ]]
[[ $broken == *"INCONCLUSIVE: baseline 0.003 GB/s"* ]]
[[ $noisy == *"INCONCLUSIVE: baseline rounds at 16777216 B spread 4.00x"* ]]
echo PASS
