#!/usr/bin/env bash
# bench decode on an emulated cluster: virtual TPOT and tokens/s per GPU for
# data- and tensor-parallel attention, and a preset whose HBM holds only a few
# sequences beside the weights refuses the batch that does not fit (as a GPU
# would) while the one that fits runs; disaggregated (1A1F, two
# micro-batches) it runs with each side's bubble, and only the attention rank
# holds KV (the FFN rank's experts alone bound nothing), so the same HBM fits
# more sequences than colocated.
# usage: bench_decode_emulated.sh SWITCHYARD MODEL_DIR
set -euo pipefail
bin=$1 model=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The draft model's weights take 3.46 MB per rank over 2 ranks; 3.9 MB leave
# room for about ten sequences of 7 positions.
cat > "$tmp/small-hbm.yaml" <<'YAML'
name: small-hbm
ranks_per_node: 2
device:
  gemm_tflops_f32_peak: 100
  gemm_tflops_bf16_peak: 200
  gemm_efficiency: 1.0
  memory_gbps_peak: 1000
  memory_efficiency: 1.0
  memory_gb: 0.0039
links:
  intra: {latency_us: 2.0, bandwidth_gbps_peak: 100, efficiency: 1.0}
  inter: {latency_us: 5.0, bandwidth_gbps_peak: 10, efficiency: 1.0}
YAML
common=(bench decode --model "$model" --steps 2 --prompt_tokens 4 --ranks 2)
out=$("$bin" "${common[@]}" --attention dp --batch 2,4096 --emulate "$tmp/small-hbm.yaml")
echo "$out"
fits=$(echo "$out" | sed -n 's/.* hold \([0-9]*\) sequences of 7 positions per token group/\1/p')
[ -n "$fits" ] && [ "$fits" -ge 2 ] && [ "$fits" -lt 2048 ]
echo "$out" | grep -Eq "^ +2 +[0-9.]+ +[0-9.]+ +[0-9.]+ "              # batch 2 ran, with a virtual TPOT
echo "$out" | grep -q "^  4096 refused: 2048 sequence(s) of 7 positions per token group .*at most $fits sequences"
tp=$("$bin" "${common[@]}" --attention tp --tp 2 --batch 4 --emulate h100-nvlink-ib)
echo "$tp"
echo "$tp" | grep -q "total tokens/s (virtual, h100-nvlink-ib)"
afd=$("$bin" "${common[@]}" --afd 1:1 --microbatches 2 --batch 2,4096 --emulate "$tmp/small-hbm.yaml")
echo "$afd"
echo "$afd" | grep -q "(1A1F), 1 token group"
afd_fits=$(echo "$afd" | sed -n 's/.* hold \([0-9]*\) sequences of 7 positions per token group/\1/p')
[ -n "$afd_fits" ] && [ "$afd_fits" -gt "$fits" ]
echo "$afd" | grep -Eq "^ +2 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+% +[0-9.]+% "
# An FFN rank's experts alone can overflow the device: the refusal names that rank, not rank 0's figures.
sed 's/memory_gb: 0.0039/memory_gb: 0.0025/' "$tmp/small-hbm.yaml" > "$tmp/smaller-hbm.yaml"
tight=$("$bin" "${common[@]}" --afd 1:1 --batch 2 --emulate "$tmp/smaller-hbm.yaml")
echo "$tight"
echo "$tight" | grep -Eq "^     2 refused: .* GB of weights on FFN rank 1; the device holds 0.0025 GB \(at most 0 sequences\)"
# Request mode runs on the wall clock: refused with the reason.
if err=$("$bin" "${common[@]}" --requests 4 --emulate h100-nvlink-ib 2>&1); then exit 1; fi
echo "$err" | grep -q -- "--emulate times batch mode in virtual time"
echo PASS
