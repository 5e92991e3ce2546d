#!/usr/bin/env bash
# Greedy generation gives the same text on one rank, on two MPI ranks
# (experts spread over them) with attention replicated and data parallel, and
# on four thread-ranks with data-parallel attention.
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
echo "1 rank                   : $one"
echo "2 MPI ranks, replicated  : $two"
echo "2 MPI ranks, dp          : $two_dp"
echo "4 thread-ranks, dp       : $four_dp"
[ -n "$one" ] && [ "$one" = "$two" ] && [ "$one" = "$two_dp" ] && [ "$one" = "$four_dp" ]
