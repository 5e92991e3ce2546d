#!/bin/sh
# Two ranks end within one of the launcher's polls: rank 2 killed outright,
# rank 0 exiting with an error just after it (as a rank whose op failed because
# of the death would: it waits for rank 2's last act, then 10 ms). The launcher must name rank 2, the cause, not the
# lower-numbered rank it happens to reap first in the same round.
# usage: launcher_reports_the_cause.sh SWITCHYARD WORKDIR
sy=$1 work=$2
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
"$sy" launch --nprocs 3 -- sh -c 'exec >/dev/null 2>&1; while [ ! -e GO ]; do sleep 0.001; done
  case $RANK in 2) touch DYING; kill -9 $$ ;; 0) while [ ! -e DYING ]; do sleep 0.001; done; sleep 0.01; exit 3 ;;
  *) sleep 5 ;; esac' &
launcher=$!
sleep 0.5
touch GO
wait $launcher
echo "launcher_exit=$?"
