#!/bin/sh
# Two ranks with torchrun's variables set by hand and nothing hosting a store
# (no `switchyard launch`, no SWITCHYARD_STORE): rank 0 must host Switchyard's
# store at MASTER_PORT + 1 and leave MASTER_PORT to torch. Rank 1 starts first
# (it must wait for rank 0's store, not fail), and MASTER_PORT is held by a
# listener standing in for torch's store: the job must not need that port.
set -eu
switchyard=$1
work=$(mktemp -d)
trap 'kill $holder 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
/usr/bin/python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $port)); s.listen(); time.sleep(60)" &
holder=$!
sleep 0.3
run() {
  env -u SWITCHYARD_STORE -u SWITCHYARD_STORE_TOKEN RANK=$1 WORLD_SIZE=2 LOCAL_RANK=$1 LOCAL_WORLD_SIZE=2 \
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$switchyard" bench comm --op allreduce -b 1K -e 64K -f 8 -n 2 -w 1 --timeout-ms 20000 > "$work/rank$1.log" 2>&1
  echo $? > "$work/rank$1.rc"
}
run 1 &
r1=$!
sleep 0.5
run 0 &
r0=$!
wait $r1 $r0
for r in 0 1; do
  rc=$(cat "$work/rank$r.rc")
  echo "--- rank $r (exit $rc)"; cat "$work/rank$r.log"
  [ "$rc" = 0 ] || { echo "FAIL: rank $r exited $rc"; exit 1; }
done
grep -q "backend ucx" "$work/rank0.log" || { echo "FAIL: rank 0 did not run the ucx backend"; exit 1; }
grep -q "Out of bounds values : 0 OK" "$work/rank0.log" || { echo "FAIL: no correct result on rank 0"; exit 1; }
echo "PASS: torchrun-style variables, rank 0 hosted the store at MASTER_PORT + 1 = $((port + 1))"
