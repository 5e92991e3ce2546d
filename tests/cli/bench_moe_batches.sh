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
slots_per_rank: 4
experts:
  0: [0, 4]
  1: [1]
  2: [5]
  3: [6, 2]
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
# Redundant experts re-placed by EPLB from the loads of earlier steps even out
# a Zipf-skewed router's rank loads on later, fresh tokens.
skewed=(bench moe --ranks 4 --num_local_experts 4 --batch_size 1 --num_tokens 256 --model_dim 32 --hidden_size 32
        --capacity_factor 0 --exchange dropless --gate_skew zipf:1.0 --num_steps 12)
ratio() { grep -o 'no padding): median [0-9.]*' <<<"$1" | awk '{print $NF}'; }
plain=$(ratio "$("$bin" "${skewed[@]}")")
out=$("$bin" "${skewed[@]}" --redundant_experts 4 --rebalance_every 4)
grep -q "rebalanced at step 8 from the loads of steps 4..7" <<<"$out" || { echo "no rebalance line in: $out"; exit 1; }
balanced=$(ratio "$out")
awk -v a="$plain" -v b="$balanced" 'BEGIN { exit !(a > 2 && b < 1.5) }' ||
  { echo "rank load max/mean: $plain without, $balanced with redundant experts"; exit 1; }
echo "rank load max/mean: $plain -> $balanced with 4 redundant experts"
# The training job: rebalancing redundant experts (EPLB + migrate) mid-training,
# and expert data parallelism, keep the losses of the plain run.
printf 'job: moe-train\ncomm: {backend: threads, ranks: 4}\nmoe: {experts: 8, top_k: 2, model_dim: 32, hidden_dim: 32, capacity_factor: 0, exchange: dropless, strategy: fixed}\ntrain: {steps: 24, tokens_per_rank: 96, log_every: 4}\n' > "$dir/train.yaml"
train_losses() { grep -o '^step .* loss [0-9.]*' <<<"$1" | awk '{print $NF}' | tr '\n' ' '; }
want=$(train_losses "$("$bin" run --config "$dir/train.yaml")")
[ -n "$want" ] || { echo "no step lines from the training job"; exit 1; }
rebalanced=$("$bin" run --config "$dir/train.yaml" --set moe.redundant_experts=4 --set moe.rebalance_every=8)
grep -q "# rebalanced at step 17: " <<<"$rebalanced" || { echo "no rebalance in: $rebalanced"; exit 1; }
[ "$(train_losses "$rebalanced")" = "$want" ] || { echo "rebalanced losses $(train_losses "$rebalanced") vs $want"; exit 1; }
nearest=$("$bin" run --config "$dir/train.yaml" --set moe.redundant_experts=4 --set moe.rebalance_every=8 \
          --set moe.replica_choice=nearest)
[ "$(train_losses "$nearest")" = "$want" ] || { echo "nearest-replica losses $(train_losses "$nearest") vs $want"; exit 1; }
if msg=$("$bin" run --config "$dir/train.yaml" --set moe.expert_parallel_size=2 --set moe.replica_choice=nearest 2>&1); then
  echo "nearest replicas with EP x DP were accepted"; exit 1
fi
grep -q "moe.replica_choice = nearest with moe.expert_parallel_size = 2" <<<"$msg" || { echo "unclear error: $msg"; exit 1; }
# Group-limited routing with EPLB's hierarchical policy (2 nodes of 2 ranks): rebalances, and bad groups are named.
grouped=$("$bin" run --config "$dir/train.yaml" --set moe.nodes=2 --set moe.expert_groups=4 --set moe.topk_groups=2 \
          --set moe.redundant_experts=4 --set moe.rebalance_every=8 --set moe.eplb_policy=hierarchical)
grep -q "# rebalanced at step 17: " <<<"$grouped" || { echo "no hierarchical rebalance in: $grouped"; exit 1; }
if msg=$("$bin" run --config "$dir/train.yaml" --set moe.expert_groups=3 2>&1); then
  echo "3 expert groups of 8 experts were accepted"; exit 1
fi
grep -q "moe.expert_groups = 3, expected a divisor of moe.experts = 8" <<<"$msg" || { echo "unclear error: $msg"; exit 1; }
edp=$("$bin" run --config "$dir/train.yaml" --set moe.expert_parallel_size=2)
[ "$(train_losses "$edp")" = "$want" ] || { echo "EP x DP losses $(train_losses "$edp") vs $want"; exit 1; }
echo "bench moe --microbatches, --placement, --send_once, --redundant_experts; run with rebalancing and EP x DP: OK"
