#!/usr/bin/env bash
# bench moe with batches in flight (--microbatches), a physical placement
# with replicas and an unused slot (--placement), and tokens sent once per
# rank (--send_once): each ends well and prints the plain run's losses
# (dropless, nothing drops); a bad placement file fails naming file and line.
# usage: bench_moe_batches.sh SWITCHYARD
set -euo pipefail
bin=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/replicas.yaml" <<'YAML'
slots_per_rank: 3
experts:
  0: [0, 3]
  1: [1]
  2: [4]
  3: [5, 2]
YAML
printf 'slots_per_rank: 2\nexperts:\n  0: [0]\n  1: [9]\n  2: [2]\n  3: [3]\n' > "$dir/bad.yaml"
common=(bench moe --ranks 2 --num_local_experts 2 --batch_size 1 --num_tokens 96 --model_dim 32 --hidden_size 48
        --num_steps 3 --capacity_factor 0 --exchange dropless --input_grad)
losses() { grep -o 'loss = [0-9.]*' <<<"$1" | tr '\n' ' '; }
plain=$("$bin" "${common[@]}")
want=$(losses "$plain")
[ -n "$want" ] || { echo "no STEP lines in:"; echo "$plain"; exit 1; }
for extra in "--microbatches 3 --a2a_ffn_overlap_degree 2" "--placement $dir/replicas.yaml" \
             "--send_once --microbatches 2 --placement $dir/replicas.yaml"; do
  # shellcheck disable=SC2086
  got=$("$bin" "${common[@]}" $extra)
  [ "$(losses "$got")" = "$want" ] || { echo "$extra: losses $(losses "$got"), plain run $want"; exit 1; }
done
if msg=$("$bin" "${common[@]}" --placement "$dir/bad.yaml" 2>&1); then
  echo "a placement with slot 9 of 4 was accepted"; exit 1
fi
grep -q "bad.yaml:4: expert 1 at physical slot 9, expected 0..3" <<<"$msg" || { echo "unclear error: $msg"; exit 1; }
echo "bench moe --microbatches, --placement, --send_once: OK"
