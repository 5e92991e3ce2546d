#!/usr/bin/env bash
# The serve job and bench decode's request mode end well and print what they
# promise: total tokens/s, TTFT and TPOT, a CSV row per request (and, with
# gnuplot, a PNG). usage: serve_job.sh SWITCHYARD SOURCE_DIR [MPIRUN MPIRUN_FLAGS...]
set -euo pipefail
bin=$1 src=$2
shift 2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$src"
check() {  # check NAME OUTPUT: the summary lines are there
  for line in 'total tokens/s: ' 'tokens/s per rank: ' 'TTFT ms: median ' 'TPOT ms: median '; do
    grep -q "^$line" <<<"$2" || { echo "$1: no '$line' line in:"; echo "$2"; exit 1; }
  done
}
job=$("$bin" run --config configs/serve.yaml --set serve.requests=9 --set serve.rate=500 --set serve.prefill_chunk=7)
check "serve job (threads)" "$job"
# Redundant experts re-placed while serving: the rebalances are logged and counted.
rebalanced=$("$bin" run --config configs/serve.yaml --set serve.requests=8 --set serve.new_tokens=8 \
             --set model.redundant_experts=2 --set model.rebalance_every=4)
check "serve job (rebalancing)" "$rebalanced"
grep -q "^# after step 4: rebalanced 8 layers onto " <<<"$rebalanced" || { echo "no rebalance after step 4 in:"; echo "$rebalanced"; exit 1; }
grep -q "^rebalances: [1-9][0-9]*, .* (every 4 steps, 2 redundant experts)" <<<"$rebalanced" \
  || { echo "no rebalance count in:"; echo "$rebalanced"; exit 1; }
if "$bin" run --config configs/serve.yaml --set model.redundant_experts=2 > "$out/bad.txt" 2>&1; then
  echo "redundant experts without model.rebalance_every was accepted"; exit 1
fi
grep -q "model.rebalance_every" "$out/bad.txt" || { echo "the error does not name model.rebalance_every:"; cat "$out/bad.txt"; exit 1; }
bench=$("$bin" bench decode --model examples/tiny_lm/draft --requests 7 --ranks 4 --attention dp --max_batch 2 \
        --kv_budget 100 --csv "$out/r.csv" --png "$out/r.png")
check "bench decode --requests" "$bench"
rows=$(wc -l < "$out/r.csv")
[ "$rows" = 8 ] || { echo "expected a header and 7 rows in the CSV, got $rows lines"; exit 1; }
if command -v gnuplot > /dev/null; then [ -s "$out/r.png" ] || { echo "no PNG"; exit 1; }; fi
if [ $# -gt 0 ]; then
  mpi=$(OMPI_MCA_btl=self,vader "$@" -np 2 "$bin" run --config configs/serve.yaml --set comm.backend=mpi \
        --set serve.requests=6 --set model.attention=replicated)
  check "serve job (mpirun, replicated)" "$mpi"
fi
echo "serve job and bench decode --requests: OK"
