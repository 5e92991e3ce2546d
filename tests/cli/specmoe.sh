#!/usr/bin/env bash
# Speculative MoE's tools end to end, small: a routing trace recorded by the
# C++ model on held-out fortunes, affinity tables (with expert grouping) for 2
# and 4 ranks, greedy generation under the grouped placement equal to one
# rank's (1, 2 and 4 thread-ranks, 2 MPI ranks) and with token shuffling in
# tensor-parallel attention (tp 4 and 2 x 2), bench specmoe's LAR lines,
# CSV and plot, and clear errors for tables of another world and a non-trace.
# usage: specmoe.sh SWITCHYARD MODEL_DIR WORKDIR MPIRUN [MPIRUN_FLAGS...]
set -euo pipefail
sy=$1 model=$2 work=$3 mpirun=$4
shift 4
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAIL: $*"; exit 1; }

"$sy" trace record --model "$model" -o "$work/trace.safetensors" --max_tokens 12000 > "$work/record.log"
grep -q "^wrote .*: 12000 tokens of [0-9]* held-out fortunes x 8 layers" "$work/record.log" || { cat "$work/record.log"; fail "trace record"; }
"$sy" trace stats "$work/trace.safetensors" | grep -q "12000 tokens, 8 layers, 8 experts, top-2" || fail "trace stats on a recorded trace"

for W in 2 4; do
  "$sy" affinity build "$work/trace.safetensors" --ranks $W -o "$work/a$W.safetensors" --model "$model" > "$work/build$W.log"
  grep -q "^wrote .* on $W ranks (grouped placement), look-back 2" "$work/build$W.log" &&
    grep -q "^held-out LAR .*tokens shuffled to their predicted ranks: 0\.[0-9]*$" "$work/build$W.log" ||
    { cat "$work/build$W.log"; fail "affinity build --ranks $W"; }
done

text() { "$@" | sed '$d'; }
args=(generate --model "$model" --prompt 'A fool and' --max_new_tokens 30)
one=$(text "$sy" "${args[@]}")
two=$(text "$sy" "${args[@]}" --ranks 2 --affinity "$work/a2.safetensors")
four=$(text "$sy" "${args[@]}" --ranks 4 --attention dp --affinity "$work/a4.safetensors")
four_tp=$(text "$sy" "${args[@]}" --ranks 4 --attention tp --tp 2 --affinity "$work/a4.safetensors")
mpi=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$sy" "${args[@]}" --attention dp --affinity "$work/a2.safetensors")
shuffled=$("$sy" "${args[@]}" --ranks 4 --attention tp --tp 4 --affinity "$work/a4.safetensors" --specmoe on)
shuffled_groups=$("$sy" "${args[@]}" --ranks 4 --attention tp --tp 2 --affinity "$work/a4.safetensors" --specmoe on)
automatic=$("$sy" "${args[@]}" --ranks 4 --attention tp --tp 4 --affinity "$work/a4.safetensors" --specmoe auto)
grep -q "local activation 0\.[0-9]* of [0-9]* choices, token shuffling on" <<< "$shuffled" || fail "no LAR line: $shuffled"
grep -q "token shuffling auto, [0-9]*% of [0-9]* layer-batches shuffled" <<< "$automatic" || fail "no auto line: $automatic"
[ "$one" = "$(sed '$d' <<< "$automatic")" ] || fail "--specmoe auto changed the greedy text"
echo "4 thread-ranks, tp 4, shuffled: $(sed '$d' <<< "$shuffled")"
echo "4 thread-ranks, tp 2, shuffled: $(sed '$d' <<< "$shuffled_groups")"
[ "$one" = "$(sed '$d' <<< "$shuffled")" ] && [ "$one" = "$(sed '$d' <<< "$shuffled_groups")" ] ||
  fail "token shuffling changed the greedy text"
echo "1 rank                      : $one"
echo "2 thread-ranks, grouped     : $two"
echo "4 thread-ranks, dp, grouped : $four"
echo "4 thread-ranks, tp, grouped : $four_tp"
echo "2 MPI ranks, dp, grouped    : $mpi"
[ -n "$one" ] && [ "$one" = "$two" ] && [ "$one" = "$four" ] && [ "$one" = "$four_tp" ] && [ "$one" = "$mpi" ] ||
  fail "a grouped placement changed the greedy text"

"$sy" bench specmoe --model "$model" --trace "$work/trace.safetensors" --ranks 2,4 --csv "$work/specmoe.csv" \
  --png "$work/specmoe.png" > "$work/bench.log"
for c in vanilla grouping shuffling both; do
  for W in 2 4; do
    grep -q "^LAR $c W=$W: 0\.[0-9]* " "$work/bench.log" || { cat "$work/bench.log"; fail "no LAR $c W=$W line"; }
  done
done
[[ $(wc -l < "$work/specmoe.csv") -eq 13 ]] || fail "expected 12 CSV rows"
# The MoE layer's virtual time with the scored routing replayed (small shapes here).
"$sy" bench specmoe --model "$model" --trace "$work/trace.safetensors" --ranks 4 --emulate h100-nvlink-ib --nodes 2 \
  --layer_model_dim 256 --layer_hidden 128 --layer_batches 1 > "$work/layer.log"
for c in vanilla grouping shuffling both; do
  grep -q "^MoE layer $c W=4: [0-9.]* ms virtual per layer and batch" "$work/layer.log" || { cat "$work/layer.log"; fail "no MoE layer $c line"; }
done

# Requests placed by affinity on dp ranks: the serving summary and the counters.
"$sy" bench decode --model "$model" --requests 8 --steps 4 --ranks 4 --attention dp --affinity "$work/a4.safetensors" \
  --scheduler affinity --prompts "$(dirname "$model")/heldout_prompts.txt" > "$work/serve.log" 2>/dev/null
grep -q "^TPOT ms: median" "$work/serve.log" && grep -q "local activation 0\.[0-9]* of [0-9]* choices" "$work/serve.log" ||
  { cat "$work/serve.log"; fail "bench decode --scheduler affinity"; }
if err=$("$sy" bench decode --model "$model" --requests 8 --ranks 4 --attention tp --tp 4 --scheduler affinity 2>&1); then
  fail "--scheduler affinity without dp accepted"; fi
grep -q "it needs --requests, --affinity TABLES and --attention dp" <<< "$err" || fail "unclear error: $err"

# The serve job's keys: tp with automatic shuffling, dp with requests placed by affinity; errors name the key.
serve=(run --config "$(dirname "$model")/../../configs/serve.yaml" --set comm.ranks=4 --set serve.requests=8
       --set serve.new_tokens=4 --set model.path="$model")
"$sy" "${serve[@]}" --set model.attention=tp --set model.tp=4 --set model.affinity="$work/a4.safetensors" \
  --set model.specmoe=auto > "$work/serve_tp.log" 2>&1 || { cat "$work/serve_tp.log"; fail "serve job, model.specmoe = auto"; }
grep -q "^speculative MoE: experts placed by .*a4.safetensors; token shuffling auto (its host cost, measured" "$work/serve_tp.log" &&
  grep -q "token shuffling auto, [0-9]*% of [0-9]* layer-batches shuffled" "$work/serve_tp.log" ||
  { cat "$work/serve_tp.log"; fail "serve job: no speculative MoE lines"; }
"$sy" "${serve[@]}" --set model.attention=dp --set model.affinity="$work/a4.safetensors" --set serve.scheduler=affinity \
  > "$work/serve_dp.log" 2>&1 && grep -q "requests placed by affinity" "$work/serve_dp.log" ||
  { cat "$work/serve_dp.log"; fail "serve job, serve.scheduler = affinity"; }
if err=$("$sy" "${serve[@]}" --set model.attention=tp --set model.tp=4 --set model.specmoe=on 2>&1); then
  fail "model.specmoe = on without tables accepted"; fi
grep -q -- "--set model.specmoe=on: model.specmoe = on shuffles tokens by model.affinity" <<< "$err" || fail "unclear error: $err"
if err=$("$sy" "${serve[@]}" --set model.affinity="$work/none.safetensors" 2>&1); then fail "missing tables accepted"; fi
grep -q "model.affinity = '.*none.safetensors' does not exist" <<< "$err" || fail "unclear error: $err"

# Tables of another world size, and a file that is not a trace.
if err=$("$sy" "${args[@]}" --ranks 2 --affinity "$work/a4.safetensors" 2>&1); then fail "tables of 4 ranks accepted on 2"; fi
grep -q "tables built for 4 ranks, the job has 2" <<< "$err" || fail "unclear error: $err"
if err=$("$sy" "${args[@]}" --ranks 4 --attention tp --tp 4 --specmoe on 2>&1); then fail "--specmoe on without tables accepted"; fi
grep -q -- "--specmoe = on needs --affinity" <<< "$err" || fail "unclear error: $err"
if err=$("$sy" "${args[@]}" --ranks 4 --attention dp --affinity "$work/a4.safetensors" --specmoe on 2>&1); then fail "--specmoe on with dp accepted"; fi
grep -q "the attention is dp (expected tp)" <<< "$err" || fail "unclear error: $err"
if err=$("$sy" affinity build "$model/model.safetensors" --ranks 2 -o "$work/x" 2>&1); then fail "a model file accepted as a trace"; fi
grep -q "model.safetensors" <<< "$err" || fail "unclear error: $err"
echo "SPECMOE_CLI_OK"
