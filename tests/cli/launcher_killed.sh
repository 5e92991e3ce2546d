#!/bin/sh
# SIGKILL the launcher while its ranks run behind a wrapper (sh -c "...; ..." keeps
# the shell as the rank's process and the real work as its child, which
# PR_SET_PDEATHSIG does not reach): within a second no process of the job may
# remain. Before the watchdog the wrapped children ran on until their own end.
# (-x: the whole command line, so the launcher and its watchdog, whose command
# lines contain the same words, are not counted as the ranks' sleeps.)
# usage: launcher_killed.sh SWITCHYARD
set -u
switchyard=$1
tag="31.$$"   # a sleep length no other process on the machine uses
"$switchyard" launch --nprocs 2 -- sh -c "sleep $tag; echo never" > /dev/null 2>&1 &
launcher=$!
for i in $(seq 50); do
  [ "$(pgrep -xf "sleep $tag" | wc -l)" -ge 2 ] && break
  sleep 0.1
done
running=$(pgrep -xf "sleep $tag" | wc -l)
[ "$running" -ge 2 ] || { echo "FAIL: the ranks did not start ($running running)"; kill -9 $launcher; exit 1; }
kill -9 $launcher
start=$(date +%s.%N)
for i in $(seq 20); do
  left=$(pgrep -xf "sleep $tag" | wc -l)
  [ "$left" -eq 0 ] && break
  sleep 0.05
done
took=$(echo "$(date +%s.%N) - $start" | bc)
if [ "$left" -ne 0 ]; then
  echo "FAIL: $left process(es) of the job still running after the launcher was SIGKILLed"
  pkill -9 -xf "sleep $tag"
  exit 1
fi
echo "PASS: every process of the job gone ${took}s after the launcher was SIGKILLed"
