#!/usr/bin/env bash
# switchyard afd plan: the deployment search answers for a published shape
# (the split, the FFN's parallelism, m, tokens/s per GPU, the colocated
# baseline, the m ablation) and for a model folder; bad searches are errors
# naming the option. The exit status and the output are both checked.
# usage: afd_plan.sh SWITCHYARD MODEL_DIR
set -euo pipefail
bin=$1 model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=$("$bin" afd plan --model step3 --emulate h800-measured --gpus 32 --context 4096 --tpot_ms 50 --csv "$tmp/p.csv")
echo "$out"
echo "$out" | grep -Eq "^best AFD: [0-9]+A[0-9]+F.*, m = [1-4], FFN ep [0-9]+.*: [0-9.]+ tokens/s per GPU at [0-9.]+ ms TPOT"
echo "$out" | grep -Eq "^best colocated: colocated on 32 GPUs.*AFD / colocated = [0-9.]+"
echo "$out" | grep -Eq "^m ablation at [0-9]+A[0-9]+F.*: m=1 [0-9.]+ m=2 [0-9.]+ \(1\.[0-9]+x\)"
echo "$out" | grep -q "MegaScale-Infer's bound for it: m >= 2 (1 + Tc / Tf)"
[ "$(head -1 "$tmp/p.csv")" = "attention_gpus,ffn_gpus,ffn_tp,microbatches,batch_per_microbatch,tpot_ms,tokens_per_s_per_gpu,ta_us,te_us,tc_us,attention_idle,ffn_idle,attention_memory_gb,ffn_memory_gb" ]
[ "$(wc -l < "$tmp/p.csv")" -gt 50 ]
folder=$("$bin" afd plan --model "$model" --emulate h100-nvlink-ib --gpus 4 --context 64 --tpot_ms 1)
echo "$folder"
echo "$folder" | grep -q "^afd plan: draft (6 layers, 6 MoE, H 128, 8 experts top-2 + 0 shared, f32 weights and KV)"
echo "$folder" | grep -Eq "^best AFD: [1-3]A[1-3]F"
if err=$("$bin" afd plan --model step3 --gpus 1 2>&1); then exit 1; fi
echo "$err" | grep -q -- "--gpus = 1, expected >= 2"
if err=$("$bin" afd plan --model gpt-9 2>&1); then exit 1; fi
echo "$err" | grep -q "expected step3 or deepseek-v3"
echo PASS
