#!/bin/sh
# A rank stopped before MPI_Init finishes: the other leaves MPI_Init at the op
# timeout (2 s here) with a clear error, and mpirun ends the job, the stopped
# rank included, instead of everyone waiting for good.
# usage: mpi_bootstrap_stopped.sh MPIEXEC SWITCHYARD [mpirun flags...]
mpiexec=$1 switchyard=$2
shift 2
SWITCHYARD_COMM_TIMEOUT_MS=2000 timeout 60 "$mpiexec" -np 2 "$@" -x SWITCHYARD_COMM_TIMEOUT_MS sh -c \
  'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then kill -STOP $$; fi; exec "$0" bench comm --backend mpi --op allreduce -b 1K -e 1K -n 1 -w 0' \
  "$switchyard" 2>&1
echo "exit=$?"
sleep 0.5
if ps -eo args | grep -q "^sh -c if \[ \"\$OMPI_COMM_WORLD_RANK\" = 1 \]"; then echo STRAY_RANKS; fi
