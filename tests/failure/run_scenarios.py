#!/usr/bin/env python3
"""Failure scenarios on every multi-process backend: a rank killed (SIGKILL) or
stopped (SIGSTOP) at bootstrap, in the middle of a collective, in the middle
of a training step and in the middle of a checkpoint save, on mpi (mpirun),
ucx (`switchyard launch`) and threads (one process: a rank that fails).

Each scenario asserts that the job exits non-zero, that some rank says why
(the message), that every process of the job is gone within the op timeout
plus a few seconds, and that no process of the job remains. The op timeout is
short (1.5 s), so the suite stays within the CI budget. It prints a table:
scenario, backend, seconds until every process had exited, exit code, message.

usage: run_scenarios.py SWITCHYARD QUICKSTART_CONFIG [--backends mpi,ucx,threads] [--csv FILE]
Environment: MPIEXEC (default mpiexec), MPI_FLAGS (default for root here).
"""
import argparse
import atexit
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid

TIMEOUT_MS = 1500
SLACK_S = 8.0  # start-up, mpirun's teardown and the launcher's grace, on a loaded 2-core machine


TAG = "SY_FAILURE_SCENARIO"
SESSIONS = []  # every job's process group, killed when this script ends however it ends


def _kill_sessions(*_):
    for pgid in SESSIONS:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


atexit.register(_kill_sessions)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, lambda *a: (_kill_sessions(), sys.exit(1)))


def job_processes(marker):
    """Pids of the scenario's job: their environment carries its tag, or they run in its directory."""
    pids = []
    tag = f"{TAG}={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd") == marker:
                pids.append(int(pid))
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def rank_pids(marker, own):
    """The job's rank processes (switchyard, not the launcher or a wrapper shell)."""
    found = []
    for pid in job_processes(marker):
        if pid == own:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"switchyard") and b"launch" not in args[:2]:
            found.append(pid)
    return sorted(found)


class Scenario:
    def __init__(self, name, backend, command, fault, message, env=None, wrapper_fault=None):
        self.name, self.backend, self.command, self.fault = name, backend, command, fault
        self.message, self.env, self.wrapper_fault = message, env or {}, wrapper_fault


def run(s, workdir):
    marker = os.path.join(workdir, f"{s.backend}-{s.name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(marker)
    env = dict(os.environ, SWITCHYARD_COMM_TIMEOUT_MS=str(TIMEOUT_MS), **s.env)
    env[TAG] = marker
    env.setdefault("OMPI_MCA_btl", "self,vader")
    start = time.monotonic()
    proc = subprocess.Popen(s.command, cwd=marker, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    SESSIONS.append(proc.pid)
    fault_time = None
    fault_sent = s.fault is None
    if s.fault:
        # Wait until the job's ranks run, then hit the last one (never rank 0 alone: it may host the store).
        deadline = time.monotonic() + 30
        ranks = []
        while time.monotonic() < deadline and proc.poll() is None:
            ranks = rank_pids(marker, proc.pid)
            if len(ranks) >= 2:
                break
            time.sleep(0.05)
        time.sleep(s.fault[1])
        if len(ranks) >= 2 and proc.poll() is None:
            os.kill(ranks[-1], s.fault[0])
            fault_time = time.monotonic()
            fault_sent = True
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_MS / 1000 + 60)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        hung = True
    # Every process of the job gone (the launcher's teardown may still be reaping for a moment); the clock
    # stops when none is left.
    leftover = job_processes(marker)
    for _ in range(40):
        if not leftover:
            break
        time.sleep(0.05)
        leftover = job_processes(marker)
    end = time.monotonic()
    for pid in leftover:  # leave the machine clean for the next scenario
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    text = out.decode(errors="replace")
    found = re.search(s.message, text)
    since_fault = end - (fault_time if fault_time else start)
    problems = []
    if not fault_sent:
        problems.append("the fault was not sent (the job's ranks never ran)")
    if hung:
        problems.append("hung")
    if proc.returncode == 0:
        problems.append("exit 0")
    if not found:
        problems.append(f"no message /{s.message}/")
    if leftover:
        problems.append(f"{len(leftover)} process(es) left")
    if since_fault > TIMEOUT_MS / 1000 + SLACK_S:
        problems.append(f"took {since_fault:.1f} s")
    line = next((l for l in text.splitlines() if found and found.group(0) in l), text.strip().splitlines()[-1:] or [""])
    line = line if isinstance(line, str) else line[0]
    return {"scenario": s.name, "backend": s.backend, "seconds": since_fault, "exit": proc.returncode,
            "message": line.strip()[:160], "problems": problems, "output": text}


def scenarios(sy, config, backends):
    mpiexec = os.environ.get("MPIEXEC", "mpiexec")
    flags = shlex.split(os.environ.get("MPI_FLAGS", "--oversubscribe --bind-to none" +
                                       (" --allow-run-as-root" if os.geteuid() == 0 else "")))
    comm = [sy, "bench", "comm", "--op", "allreduce", "-b", "256K", "-e", "256K", "-n", "1000000", "-w", "0",
            "--timeout-ms", str(TIMEOUT_MS)]
    lm = [sy, "run", "--config", config, "--set", "lm.layers=1", "--set", "lm.seq=32", "--set", "lm.batch=4",
          "--set", "moe.model_dim=32", "--set", "moe.hidden_dim=32", "--set", "lm.eval_sequences=8",
          "--set", "lm.eval_every=100000", "--set", "train.warmup=2", "--set", "moe.strategy=fixed",
          "--set", "moe.exchange=dropless", "--set", f"comm.timeout_ms={TIMEOUT_MS}"]
    train = lm + ["--set", "train.steps=100000"]
    save = lm + ["--set", "train.steps=4", "--set", "train.checkpoint=ckpt", "--set", "train.checkpoint_every=2"]
    # At bootstrap: rank 1's wrapper shell kills or stops itself before switchyard starts.
    def at_start(cmd, sig, rank_var):
        return ["sh", "-c", f'if [ "${rank_var}" = 1 ]; then kill -{sig} $$; fi; exec "$@"', "sh"] + cmd

    def only_rank1(cmd, rank_var, var, value):
        return ["sh", "-c", f'if [ "${rank_var}" = 1 ]; then export {var}={value}; fi; exec "$@"', "sh"] + cmd

    out = []
    if "mpi" in backends:
        mpi = [mpiexec, "-np", "2"] + flags + ["-x", "SWITCHYARD_COMM_TIMEOUT_MS", "-x", "OMPI_MCA_btl"]
        r = "OMPI_COMM_WORLD_RANK"
        out += [
            Scenario("kill at bootstrap", "mpi", mpi + at_start(comm + ["--backend", "mpi"], "KILL", r), None,
                     r"exited on signal 9|1 process returned\s+a non-zero exit code"),
            Scenario("stop at bootstrap", "mpi", mpi + at_start(comm + ["--backend", "mpi"], "STOP", r), None,
                     r"MPI_Init did not finish within"),
            Scenario("kill mid-collective", "mpi", mpi + comm + ["--backend", "mpi"], (signal.SIGKILL, 1.0),
                     r"process rank 1 .* exited on signal 9"),
            Scenario("stop mid-collective", "mpi", mpi + comm + ["--backend", "mpi"], (signal.SIGSTOP, 1.0),
                     r"timed out after \d+ ms"),
            Scenario("kill mid-step", "mpi", mpi + train, (signal.SIGKILL, 1.5), r"process rank 1 .* exited on signal 9"),
            Scenario("kill mid-save", "mpi", mpi + only_rank1(save, r, "SWITCHYARD_FAILPOINT", "checkpoint.shard_saved"),
                     None, r"process rank 1 .* exited on signal 9"),
        ]
    if "ucx" in backends:
        launch = [sy, "launch", "--nprocs", "2", "--"]
        r = "RANK"
        out += [
            Scenario("kill at bootstrap", "ucx", launch + at_start(comm + ["--backend", "ucx"], "KILL", r), None,
                     r"switchyard launch: rank 1 exited with code 137"),
            Scenario("stop at bootstrap", "ucx", launch + at_start(comm + ["--backend", "ucx"], "STOP", r), None,
                     r"keys not set within \d+ ms: 'bootstrap/ucx/addr/1'"),
            Scenario("kill mid-collective", "ucx", launch + comm + ["--backend", "ucx"], (signal.SIGKILL, 1.0),
                     r"switchyard launch: rank 1 exited with code 137"),
            Scenario("stop mid-collective", "ucx", launch + comm + ["--backend", "ucx"], (signal.SIGSTOP, 1.0),
                     r"rank 1 stopped its heartbeat|timed out after \d+ ms|to rank 1 .*a peer failed"),
            Scenario("kill mid-step", "ucx", launch + train, (signal.SIGKILL, 1.5),
                     r"switchyard launch: rank 1 exited with code 137"),
            Scenario("kill mid-save", "ucx", launch + only_rank1(save, r, "SWITCHYARD_FAILPOINT", "checkpoint.shard_saved"),
                     None, r"switchyard launch: rank 1 exited with code 137"),
        ]
    if "threads" in backends:
        # One process: a kill takes every rank at once (the checkpoint test covers what a killed save leaves);
        # what is left is a rank that cannot start.
        out += [
            Scenario("bad rank at bootstrap", "threads", comm + ["--ranks", "600"], None,
                     r"cannot start thread-rank \d+ of 600", env={}),
        ]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("switchyard")
    ap.add_argument("config")
    ap.add_argument("--backends", default="mpi,ucx,threads")
    ap.add_argument("--csv")
    a = ap.parse_args()
    backends = a.backends.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="sy-failure-") as work:
        work = os.path.realpath(work)
        for s in scenarios(os.path.realpath(a.switchyard), os.path.realpath(a.config), backends):
            if s.name == "bad rank at bootstrap":  # needs an address-space limit: run through sh with ulimit
                s.command = ["sh", "-c", "ulimit -v 4000000; exec \"$@\"", "sh"] + s.command
            res = run(s, work)
            results.append(res)
            status = "FAIL" if res["problems"] else "ok  "
            print(f"{status} {res['backend']:8s} {res['scenario']:22s} {res['seconds']:6.2f} s  exit {res['exit']:4d}  "
                  f"{res['message']}{'  <- ' + ', '.join(res['problems']) if res['problems'] else ''}", flush=True)
            if res["problems"]:
                print("    output: " + "\n    ".join(res["output"].strip().splitlines()[-12:]), flush=True)
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("scenario,backend,seconds,exit,message\n")
            for r in results:
                f.write(f"\"{r['scenario']}\",{r['backend']},{r['seconds']:.3f},{r['exit']},\"{r['message'].replace(chr(34), chr(39))}\"\n")
    failed = sum(1 for r in results if r["problems"])
    print(f"{len(results) - failed} of {len(results)} failure scenarios behaved (op timeout {TIMEOUT_MS} ms)")
    print("FAILURE_SCENARIOS_OK" if failed == 0 else "FAILURE_SCENARIOS_FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
