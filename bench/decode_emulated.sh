#!/usr/bin/env bash
# Decode on an emulated GPU cluster: `switchyard bench decode --emulate` for
# data-parallel and tensor-parallel attention at 8 and 16 ranks (one and two
# nodes of the preset), virtual TPOT and tokens/s per GPU per batch size, the
# batch the preset's HBM allows, and a PNG of tokens/s per GPU against the
# batch. Virtual times are deterministic (the device and link models), so one
# run per configuration is enough; the wall column is this machine's.
#
# usage: bench/decode_emulated.sh BUILD_DIR [OUT_DIR]
# Environment (optional): PRESET=h100-nvlink-ib, MODEL=examples/tiny_lm/base,
#   BATCHES=1,16,64,256, STEPS=16.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 BUILD_DIR [OUT_DIR]" >&2; exit 2; }
bin=$1/bin/switchyard
out=${2:-bench-results/decode/emulated}
preset=${PRESET:-h100-nvlink-ib} model=${MODEL:-examples/tiny_lm/base}
batches=${BATCHES:-1,16,64,256} steps=${STEPS:-16}
mkdir -p "$out"
configs=("8 dp 1" "8 tp 2" "8 tp 8" "16 dp 1" "16 tp 2" "16 tp 8")
plot=""
for c in "${configs[@]}"; do
  read -r ranks mode tp <<<"$c"
  name="${preset}_${ranks}ranks_${mode}${tp}"
  echo "== $ranks ranks, attention $mode (tp $tp)" >&2
  args=(bench decode --model "$model" --batch "$batches" --steps "$steps" --ranks "$ranks" --attention "$mode"
        --emulate "$preset" --csv "$out/$name.csv")
  label="$ranks ranks $mode"
  if [[ $mode == tp ]]; then args+=(--tp "$tp"); label+=" $tp"; fi
  OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} "$bin" "${args[@]}" | grep -Ev "^(bench decode|batch mode|floor)"
  plot+="${plot:+, }'$out/$name.csv' every ::1 using 1:6 with linespoints title '$label'"
done
if command -v gnuplot >/dev/null; then
  gnuplot -e "set terminal pngcairo size 900,600; set output '$out/${preset}_tokens_per_gpu.png'; set datafile separator ',';
    set logscale x 2; set logscale y; set grid; set key top left; set xlabel 'batch (sequences, all ranks)';
    set ylabel 'tokens/s per GPU (virtual)'; set title 'bench decode --emulate $preset: $(basename "$model")';
    plot $plot"
  echo "# wrote $out/${preset}_tokens_per_gpu.png" >&2
fi
