#!/usr/bin/env bash
# Greedy generation gives the same text on one rank, on two MPI ranks
# (experts spread over them) with attention replicated and data parallel, and
# on four thread-ranks with data-parallel attention, and with tensor-parallel
# attention on two MPI ranks (one group of 2) and four thread-ranks (2 x 2),
# and speculatively with the draft (greedy speculative decoding is exact),
# and attention-FFN disaggregated (--afd) on two MPI ranks (1A1F, two
# micro-batches) and four thread-ranks (2A2F with three, 1A3F with one,
# interleaved roles [1,3]:[0,2]).
# TP logits differ from one rank's in the last bits (the heads' partial sums
# are reduce-scattered), so equal text here is this prompt's, whose greedy
# margins are wide; the engine tests bound the logits for random prompts.
# usage: generate_ranks_agree.sh SWITCHYARD MODEL_DIR MPIRUN [MPIRUN_FLAGS...]
set -euo pipefail
bin=$1 model=$2 mpirun=$3
shift 3
text() { "$@" | sed '$d'; }
args=(generate --model "$model" --prompt 'A fool and' --max_new_tokens 40)
one=$(text "$bin" "${args[@]}")
two=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$bin" "${args[@]}")
two_dp=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$bin" "${args[@]}" --attention dp)
four_dp=$(text "$bin" "${args[@]}" --ranks 4 --attention dp)
two_tp=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$bin" "${args[@]}" --attention tp --tp 2)
four_tp=$(text "$bin" "${args[@]}" --ranks 4 --attention tp --tp 2)
spec=$(text "$bin" "${args[@]}" --draft "$(dirname "$model")/draft" --gamma 3 --ranks 2 --attention dp)
afd_two=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$bin" "${args[@]}" --afd 1:1 --microbatches 2)
afd_four=$(text "$bin" "${args[@]}" --ranks 4 --afd 2:2 --microbatches 3)
afd_one_three=$(text "$bin" "${args[@]}" --ranks 4 --afd 1:3)
afd_lists=$(text "$bin" "${args[@]}" --ranks 4 --afd '[1,3]:[0,2]')  # an FFN rank first: rank 1 streams
# bf16 payloads: disaggregated equals colocated with the same payloads (the text may differ from f32's).
bf16=(--dispatch_dtype bf16 --combine_dtype bf16)
dp_bf16=$(text "$bin" "${args[@]}" --ranks 4 --attention dp "${bf16[@]}")
afd_bf16=$(text "$bin" "${args[@]}" --ranks 4 --afd 2:2 --microbatches 2 "${bf16[@]}")
# Step-3's payloads: fp8 rows out, bf16 results back.
fp8=(--dispatch_dtype fp8 --combine_dtype bf16)
dp_fp8=$(text "$bin" "${args[@]}" --ranks 4 --attention dp "${fp8[@]}")
afd_fp8=$(text "$bin" "${args[@]}" --ranks 4 --afd 2:2 --microbatches 2 "${fp8[@]}")
echo "4 thread-ranks, dp, bf16 : $dp_bf16"
echo "2A2F, m 2, bf16 payloads : $afd_bf16"
echo "4 thread-ranks, dp, fp8  : $dp_fp8"
echo "2A2F, m 2, fp8 payloads  : $afd_fp8"
echo "1 rank                   : $one"
echo "2 MPI ranks, replicated  : $two"
echo "2 MPI ranks, dp          : $two_dp"
echo "4 thread-ranks, dp       : $four_dp"
echo "2 MPI ranks, tp 2        : $two_tp"
echo "4 thread-ranks, tp 2     : $four_tp"
echo "speculative, gamma 3     : $spec"
echo "2 MPI ranks, 1A1F, m 2   : $afd_two"
echo "4 thread-ranks, 2A2F, m 3: $afd_four"
echo "4 thread-ranks, 1A3F     : $afd_one_three"
echo "4 thread-ranks, [1,3]:[0,2]: $afd_lists"
[ -n "$one" ] && [ "$one" = "$two" ] && [ "$one" = "$two_dp" ] && [ "$one" = "$four_dp" ] && [ "$one" = "$two_tp" ] &&
  [ "$one" = "$four_tp" ] && [ "$one" = "$spec" ] && [ "$one" = "$afd_two" ] && [ "$one" = "$afd_four" ] &&
  [ "$one" = "$afd_one_three" ] && [ "$one" = "$afd_lists" ] && [ -n "$dp_bf16" ] && [ "$dp_bf16" = "$afd_bf16" ] &&
  [ -n "$dp_fp8" ] && [ "$dp_fp8" = "$afd_fp8" ]
