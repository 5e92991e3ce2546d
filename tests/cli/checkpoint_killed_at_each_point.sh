#!/usr/bin/env bash
# A save killed (SIGKILL, through SWITCHYARD_FAILPOINT) at each point of its
# protocol leaves a checkpoint that loads: the manifest names one complete
# generation (the previous one, or the new one once its manifest is in place),
# `generate` reads it with its checksums, and the job resumes from it and saves
# again (no stale lock or temporary file in the way). The job runs on 2
# thread-ranks, so the kill takes every rank at once.
# usage: checkpoint_killed_at_each_point.sh SWITCHYARD CONFIG WORKDIR
set -euo pipefail
sy=$1 config=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
small=(--set comm.ranks=2 --set lm.layers=1 --set lm.seq=32 --set lm.batch=4 --set moe.model_dim=32
       --set moe.hidden_dim=32 --set lm.eval_sequences=8 --set lm.eval_every=100000 --set train.log_every=1
       --set train.warmup=2 --set moe.strategy=fixed --set moe.exchange=dropless --set train.checkpoint_every=2)
generation() { sed -n 's/.*"generation": *\([0-9]*\).*/\1/p' "$1/manifest.json" | head -1; }
next_step() { sed -n 's/.*"next_step": "\([0-9]*\)".*/\1/p' "$1/manifest.json"; }
# One healthy save (steps 1-2), copied for each point.
"$sy" run --config "$config" "${small[@]}" --set train.steps=2 --set train.checkpoint="$work/base" > "$work/base.log" 2>&1 ||
  { cat "$work/base.log"; echo "FAIL: the first save"; exit 1; }
g0=$(generation "$work/base")
for point in checkpoint.locked safetensors.partly_written checkpoint.shard_saved checkpoint.manifest_written \
             checkpoint.published checkpoint.side_files_written; do
  dir="$work/$point"
  cp -r "$work/base" "$dir"
  set +e
  SWITCHYARD_FAILPOINT=$point "$sy" run --config "$config" "${small[@]}" --set train.steps=4 \
    --set train.checkpoint="$dir" --set train.resume=true > "$dir.killed.log" 2>&1
  code=$?
  set -e
  [[ $code -eq 137 ]] || { cat "$dir.killed.log"; echo "FAIL: $point: the save was not killed (exit $code)"; exit 1; }
  g=$(generation "$dir")
  case $point in
    checkpoint.published|checkpoint.side_files_written) want=$((g0 + 1)) ;;  # the manifest was in place
    *) want=$g0 ;;
  esac
  [[ "$g" == "$want" ]] || { echo "FAIL: $point: the manifest names generation $g, expected $want"; exit 1; }
  "$sy" generate --model "$dir" --prompt "The " --max_new_tokens 4 > "$dir.gen.log" 2>&1 ||
    { cat "$dir.gen.log"; echo "FAIL: $point: generate cannot read the checkpoint the killed save left"; exit 1; }
  step=$(next_step "$dir")
  "$sy" run --config "$config" "${small[@]}" --set train.steps=$((step + 2)) --set train.checkpoint="$dir" \
    --set train.resume=true > "$dir.resume.log" 2>&1 ||
    { cat "$dir.resume.log"; echo "FAIL: $point: resuming after the killed save"; exit 1; }
  grep -q "at step $step" "$dir.resume.log" || { cat "$dir.resume.log"; echo "FAIL: $point: resumed elsewhere"; exit 1; }
  [[ $(generation "$dir") -gt $g ]] || { echo "FAIL: $point: the resumed job saved no new generation"; exit 1; }
  stray=$(find "$dir" -name '*.tmp*' | wc -l)
  [[ $stray -eq 0 ]] || { ls -la "$dir"; echo "FAIL: $point: temporary files left after the next save"; exit 1; }
  echo "ok   $point: killed (exit 137), generation $g loads, resumed at step $step"
done
echo "CHECKPOINT_KILL_POINTS_OK"
