#!/usr/bin/env bash
# A rank killed (SIGKILL) while the job saves a checkpoint every step leaves a
# loadable checkpoint: the manifest names one complete generation, generate
# reads it, and the job resumes from it. The job runs under mpirun (one rank
# per process); the kill lands wherever the saves happen to be.
# usage: lm_train_killed_save.sh SWITCHYARD CONFIG WORKDIR MPIEXEC [MPI FLAGS...]
set -euo pipefail
sy=$1 config=$2 work=$3 mpiexec=$4
shift 4
rm -rf "$work" && mkdir -p "$work"
small=(--set lm.layers=1 --set lm.seq=32 --set lm.batch=4 --set moe.model_dim=32 --set moe.hidden_dim=32
       --set lm.eval_sequences=8 --set lm.eval_every=100000 --set train.log_every=1 --set train.warmup=4
       --set moe.strategy=fixed --set moe.exchange=dropless --set comm.timeout_ms=5000)
"$mpiexec" "$@" -np 2 "$sy" run --config "$config" "${small[@]}" --set train.steps=100000 \
  --set train.checkpoint="$work/ckpt" --set train.checkpoint_every=1 > "$work/job.log" 2>&1 &
job=$!
# Wait for a few saves, then kill one rank's process outright.
for _ in $(seq 1 300); do
  (( $(grep -c '^checkpoint: ' "$work/job.log" || true) >= 5 )) && break
  sleep 0.1
done
victim=$(pgrep -f "^$sy run --config $config .*train.checkpoint=$work/ckpt" | tail -1 || true)  # a rank, not mpiexec
[[ -n "$victim" ]] || { cat "$work/job.log"; echo "FAIL: no rank process to kill"; exit 1; }
kill -9 "$victim"
set +e
timeout 60 tail --pid=$job -f /dev/null
wait $job
code=$?
set -e
[[ $code -ne 0 ]] || { echo "FAIL: the job exited 0 after a rank was killed"; exit 1; }
saves=$(grep -c '^checkpoint: ' "$work/job.log" || true)
echo "job exited $code after $saves saves"
# The newest complete generation loads: generate reads it, and the job resumes from it on one rank.
"$sy" generate --model "$work/ckpt" --prompt "The " --max_new_tokens 8 > "$work/gen.log" 2>&1 ||
  { cat "$work/gen.log"; echo "FAIL: generate could not read the checkpoint left by the killed job"; exit 1; }
step=$(sed -n 's/.*"next_step": "\([0-9]*\)".*/\1/p' "$work/ckpt/manifest.json")
"$sy" run --config "$config" "${small[@]}" --set comm.ranks=1 --set train.steps=$((step + 2)) \
  --set train.checkpoint="$work/ckpt" --set train.resume=true > "$work/resume.log" 2>&1 ||
  { cat "$work/resume.log"; echo "FAIL: resuming from the checkpoint left by the killed job"; exit 1; }
grep -q "saved by 2 ranks) at step $step" "$work/resume.log" || { cat "$work/resume.log"; echo "FAIL: resumed elsewhere"; exit 1; }
echo "PASS: a rank killed mid-run (saving every step) left generation with step $step loadable and resumable"
