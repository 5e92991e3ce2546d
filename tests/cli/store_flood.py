"""A real 2-rank job bootstraps through `switchyard launch`'s TCP store while
threads flood that store with wrong-token hellos (before the fix each refused
connection kept a descriptor and a slot, and 4,200 of them made the job fail
at bootstrap with "nothing answers"). The ranks wait until 4,200 bad hellos
have been refused, then bootstrap while the flood goes on; the job must
succeed.

usage: store_flood.py SWITCHYARD_BINARY
"""
import os
import socket
import struct
import tempfile
import subprocess
import sys
import threading
import time

switchyard = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

token = b"not-the-jobs-token"
hello = struct.pack("<BI", 1, 1) + struct.pack("<I", len(token)) + token
frame = struct.pack("<I", len(hello)) + hello
stop = threading.Event()
counts = {"refused": 0, "other": 0}
lock = threading.Lock()


def flood():
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(frame)
                reply = b""
                while True:
                    chunk = c.recv(256)
                    if not chunk:
                        break
                    reply += chunk
            with lock:
                counts["refused" if b"wrong token" in reply else "other"] += 1
        except OSError:
            time.sleep(0.001)  # the launcher has not opened the store yet, or it is busy


flag = os.path.join(tempfile.mkdtemp(), "go")


def release_when_flooded():
    while counts["refused"] < 4200 and not stop.is_set():
        time.sleep(0.01)
    open(flag, "w").close()


threads = [threading.Thread(target=flood, daemon=True) for _ in range(3)] + \
    [threading.Thread(target=release_when_flooded, daemon=True)]
for t in threads:
    t.start()
start = time.monotonic()
bench = f"{switchyard} bench comm --op allreduce -b 1K -e 64K -f 4 -n 20 -w 2 --timeout-ms 30000"
job = subprocess.Popen([switchyard, "launch", "--nprocs", "2", "--master", f"127.0.0.1:{port}", "--", "sh", "-c",
                        f"while [ ! -e {flag} ]; do sleep 0.05; done; exec {bench}"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    out, _ = job.communicate(timeout=90)
except subprocess.TimeoutExpired:
    job.kill()
    out, _ = job.communicate()
stop.set()
for t in threads:
    t.join(timeout=5)
text = out.decode(errors="replace")
print(text.strip()[-1500:])
print(f"bad hellos refused while the job waited and bootstrapped: {counts['refused']} (other outcomes: {counts['other']}); "
      f"job exit {job.returncode} after {time.monotonic() - start:.1f} s")
ok = job.returncode == 0 and "Out of bounds values : 0 OK" in text and counts["refused"] >= 4200
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
