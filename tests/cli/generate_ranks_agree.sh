#!/usr/bin/env bash
# Greedy generation gives the same text on one rank and on two MPI ranks
# (experts spread over them). usage: generate_ranks_agree.sh SWITCHYARD MODEL_DIR MPIRUN [MPIRUN_FLAGS...]
set -euo pipefail
bin=$1 model=$2 mpirun=$3
shift 3
text() { "$@" generate --model "$model" --prompt 'A fool and' --max_new_tokens 40 | sed '$d'; }
one=$(text "$bin")
two=$(OMPI_MCA_btl=self,vader text "$mpirun" -np 2 "$@" "$bin")
echo "1 rank : $one"
echo "2 ranks: $two"
[ -n "$one" ] && [ "$one" = "$two" ]
