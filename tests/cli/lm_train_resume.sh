#!/usr/bin/env bash
# moe-lm-train end to end, small: a run stopped at step 10 (train.stop_after)
# and resumed prints the losses of an uninterrupted run digit for digit (fp32,
# thread-ranks, fixed plan); the checkpoint resumes at another world size and
# `switchyard generate` continues a prompt from it; the auto planner's probe
# and plan lines appear.
# usage: lm_train_resume.sh SWITCHYARD CONFIG WORKDIR
set -euo pipefail
sy=$1 config=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
small=(--set lm.layers=1 --set lm.seq=32 --set lm.batch=6 --set moe.model_dim=32 --set moe.hidden_dim=32
       --set lm.eval_sequences=16 --set lm.eval_every=1000 --set train.steps=20 --set train.log_every=1
       --set train.warmup=4 --set comm.ranks=4)
fixed=(--set moe.strategy=fixed --set moe.exchange=dropless)
losses() { sed -n 's/^step *\([0-9]*\)\/20  loss \([0-9.]*\) .*/\1 \2/p' "$1"; }

"$sy" run --config "$config" "${small[@]}" "${fixed[@]}" --set train.checkpoint="$work/straight" > "$work/straight.log"
"$sy" run --config "$config" "${small[@]}" "${fixed[@]}" --set train.checkpoint="$work/split" --set train.stop_after=10 \
  > "$work/first.log"
grep -q "checkpoint: $work/split (generation 1, step 10)" "$work/first.log" || { cat "$work/first.log"; echo "FAIL: no checkpoint at step 10"; exit 1; }
cp -r "$work/split" "$work/split-at-10"
"$sy" run --config "$config" "${small[@]}" "${fixed[@]}" --set train.checkpoint="$work/split" --set train.resume=true \
  > "$work/second.log"
grep -q "resumed from $work/split (generation 1, saved by 4 ranks) at step 10" "$work/second.log" || { cat "$work/second.log"; echo "FAIL: did not resume"; exit 1; }
cat "$work/first.log" "$work/second.log" > "$work/split.log"
if ! diff <(losses "$work/straight.log") <(losses "$work/split.log"); then
  echo "FAIL: the resumed run's losses differ from the uninterrupted run's"; exit 1
fi
[[ $(losses "$work/split.log" | wc -l) -eq 20 ]] || { echo "FAIL: expected 20 loss lines"; exit 1; }
held() { sed -n 's/^held-out loss \([0-9.]*\) .*after 20 steps$/\1/p' "$1"; }
[[ -n "$(held "$work/straight.log")" && "$(held "$work/straight.log")" == "$(held "$work/second.log")" ]] ||
  { echo "FAIL: held-out losses differ: $(held "$work/straight.log") vs $(held "$work/second.log")"; exit 1; }

# The step-10 checkpoint of 4 ranks, resumed on 2 (experts found in whichever shard holds them).
"$sy" run --config "$config" "${small[@]}" "${fixed[@]}" --set comm.ranks=2 --set train.checkpoint="$work/split-at-10" \
  --set train.resume=true > "$work/two.log"
grep -q "saved by 4 ranks) at step 10" "$work/two.log" && grep -q "^held-out loss .* after 20 steps" "$work/two.log" ||
  { cat "$work/two.log"; echo "FAIL: resuming on 2 ranks"; exit 1; }

# generate reads the training checkpoint.
out=$("$sy" generate --model "$work/straight" --prompt "The " --max_new_tokens 16)
[[ ${#out} -gt 4 ]] || { echo "FAIL: generate printed '$out'"; exit 1; }

# Expert grouping from the checkpoint's own routing: a grouped placement loads the checkpoint (experts keyed by
# logical id) on 2 ranks and continues the prompt alike.
"$sy" trace record --model "$work/straight" -o "$work/trace.safetensors" --max_tokens 3000 > /dev/null
"$sy" affinity build "$work/trace.safetensors" --ranks 2 -o "$work/affinity.safetensors" > /dev/null
grouped=$("$sy" generate --model "$work/straight" --prompt "The " --max_new_tokens 16 --ranks 2 --affinity "$work/affinity.safetensors")
[[ "$(head -1 <<< "$out")" == "$(head -1 <<< "$grouped")" ]] || { echo "FAIL: grouped placement generates '$grouped', not '$out'"; exit 1; }

# ckpt reshard rewrites it as 2 ranks store it; generate reads that too and continues the prompt alike (greedy).
"$sy" ckpt reshard --from "$work/straight" --to "$work/two-shards" --ranks 2 | grep -q "into 2 shards" ||
  { echo "FAIL: ckpt reshard"; exit 1; }
again=$("$sy" generate --model "$work/two-shards" --prompt "The " --max_new_tokens 16)
[[ "$(head -1 <<< "$out")" == "$(head -1 <<< "$again")" ]] || { echo "FAIL: resharded checkpoint generates '$again', not '$out'"; exit 1; }

# auto: the probe, then plan lines comparing auto with the best fixed plan.
"$sy" run --config "$config" "${small[@]}" --set lm.probe_plans=1 --set train.checkpoint="$work/auto" > "$work/auto.log"
grep -q "(probing r = " "$work/auto.log" && grep -q "^plan: auto ran .* vs the best probed plan .* on [0-9]* interleaved steps .* auto/best [0-9.]*$" "$work/auto.log" ||
  { cat "$work/auto.log"; echo "FAIL: no probe or plan line"; exit 1; }
echo "PASS: resume equals the uninterrupted run; resumed on 2 ranks; generate read the checkpoint, under a grouped placement and resharded; plan lines"
