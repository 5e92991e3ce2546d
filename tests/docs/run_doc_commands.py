#!/usr/bin/env python3
"""Runs every command the docs show (```sh blocks of README.md and docs/*.md),
with small sizes, so a documented command cannot rot: each must exit 0 within
its time limit. Sizes are shrunk by the rules in SHRINK (fewer steps, smaller
messages, fewer requests and tokens); outputs the docs name (CSV, PNG,
checkpoints) go to a scratch directory. Commands that cannot run here are
listed in SKIP with the reason (the two commands the README starts with, a
second node, a GPU machine, the hour-long measurements).

usage: run_doc_commands.py SOURCE_DIR [--build DIR] [--only SUBSTRING] [--list]
(--build: the build directory the docs call build/; default SOURCE_DIR/build)
Prints one line per command: ok/FAIL/skip, seconds, file:line, the command as run.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# Commands (prefix after shrinking) that are not run, and why.
SKIP = [
    (r"^make (run|test)\b", "the README's own two commands (they run the build and this suite)"),
    (r"-- CMD\b", "a placeholder for the user's command"),
    (r"--nnodes 2", "needs a second node"),
    (r"^export ", "environment setup for the two-node example"),
    (r"^tests/gpu/", "runs on a GPU machine (docs/gpu.md)"),
    (r"^bench/plan_sweep\.sh", "the planner measurement: an hour of emulated sweeps"),
    (r"^bench/decode_dp_scaling\.sh", "a measurement: alternated decode runs, minutes"),
    (r"bench/python_train_step\.py", "a measurement: alternated training steps against their parts, minutes"),
]

MPI_FLAGS = "--oversubscribe --bind-to none" + (" --allow-run-as-root" if os.geteuid() == 0 else "")


def shrink(cmd, scratch):
    """The command with small sizes and its outputs in `scratch`."""
    c = cmd
    subs = [
        (r"(?<![\w.-])/tmp/(\S+)", lambda m: os.path.join(scratch, m.group(1))),
        (r"--num_steps \d+", "--num_steps 1"),
        (r"--steps \d+", "--steps 2"),
        (r"--set train\.steps=\d+", "--set train.steps=3"),
        (r"--set train\.stop_after=\d+", "--set train.stop_after=2"),
        (r"--max_new_tokens \d+", "--max_new_tokens 4"),
        (r"--requests \d+", "--requests 4"),
        (r"--batch ([\d]+)(,[\d]+)?(,[\d,]+)?", lambda m: "--batch " + m.group(1) + (m.group(2) or "")),

        (r"--set bench\.max_bytes=\S+", "--set bench.max_bytes=64K"),
        (r"bench scale --mode weak --ranks \S+", "bench scale --mode weak --ranks 1,2"),
        (r"--ranks 64 ", "--ranks 8 "),
        (r"--csv (\S+)", lambda m: "--csv " + os.path.join(scratch, os.path.basename(m.group(1)))),
        (r"--png (\S+)", lambda m: "--png " + os.path.join(scratch, os.path.basename(m.group(1)))),
        (r"--timeline (\S+)", lambda m: "--timeline " + os.path.join(scratch, os.path.basename(m.group(1)))),
        (r"--model runs/quickstart", "--model " + os.path.join(scratch, "quickstart")),
        (r"^mpirun ", f"mpirun {MPI_FLAGS} "),
        (r"^bench/compare_alltoall\.sh build", 'ROUNDS=1 SIZES="-b 64K -e 256K -f 4" bench/compare_alltoall.sh build'),
    ]
    for pattern, repl in subs:
        c = re.sub(pattern, repl, c)
    # Jobs: few steps, few requests, checkpoints in the scratch directory.
    if " run --config " in c:
        extra = []
        if "quickstart.yaml" in c:
            extra += ["--set", "lm.eval_every=100000", "--set", "lm.eval_sequences=8",
                      "--set", "train.checkpoint=" + os.path.join(scratch, "quickstart")]
            if "train.steps" not in c and "stop_after" not in c:
                extra += ["--set", "train.steps=3" if "resume" not in c else "train.steps=6"]
        if any(f in c for f in ("moe-regression.yaml", "cpu-mpi.yaml")) and "train.steps" not in c:
            extra += ["--set", "train.steps=3"]
        if "serve.yaml" in c:
            extra += ["--set", "serve.requests=4", "--set", "serve.new_tokens=4"]
        if "comm-bench" in c:
            extra += ["--set", "bench.iters=1", "--set", "bench.warmup=0"]
            if "max_bytes" not in c:
                extra += ["--set", "bench.max_bytes=64K"]
        c += " " + " ".join(shlex.quote(e) for e in extra)
    if " bench moe " in c:  # Tutel's sizes take seconds a step here: the small ones, unless the doc gives them
        for option, value in (("--batch_size", "1"), ("--num_tokens", "64"), ("--model_dim", "64"), ("--hidden_size", "64")):
            if option not in c:
                c += f" {option} {value}"
    if " bench comm " in c:  # message sizes: only bench comm's -b/-e
        c = re.sub(r"( bench comm .*?) -e \S+", r"\1 -e 256K", c)
        c = re.sub(r"( bench comm .*?) -b \S+", r"\1 -b 1K", c)
        if " -n " not in c:
            c += " -n 1 -w 0"
    if " bench scale " in c:  # its CSV and plot go to the scratch directory, not the source tree
        for option, name in (("--csv", "bench-scale.csv"), ("--png", "bench-scale.png")):
            if option not in c:
                c += f" {option} {os.path.join(scratch, name)}"
    if re.search(r" (trace record|bench specmoe) ", c) and "--max_tokens" not in c and "--trace" not in c:
        c += " --max_tokens 12000"  # the whole held-out set takes half a minute to record
    if re.search(r" generate ", c) and "--max_new_tokens" not in c:
        c += " --max_new_tokens 4"
    if re.search(r"bench decode ", c) and "--steps" not in c and "--requests" not in c:
        c += " --steps 2"
    if "examples/torch_moe/train.py" in c and "--steps" not in c:
        c += " --steps 2"
    if "bench/python_binding.py" in c:
        c += " --tokens 64 --model_dim 32"
    return c


def doc_commands(source):
    """(file:line, command) for each shell line of the docs' sh blocks; `--set ...` lines are override examples."""
    files = [os.path.join(source, "README.md")] + sorted(
        os.path.join(source, "docs", f) for f in os.listdir(os.path.join(source, "docs")) if f.endswith(".md"))
    out = []
    for path in files:
        in_block = False
        with open(path) as f:
            for n, line in enumerate(f, 1):
                s = line.rstrip("\n")
                if s.startswith("```"):
                    in_block = not in_block and bool(re.match(r"```(sh|bash|shell)\s*$", s))
                    continue
                if not in_block:
                    continue
                try:
                    words = shlex.split(s, comments=True)
                except ValueError:
                    words = s.split()
                if not words:
                    continue
                cmd = " ".join(shlex.quote(w) if re.search(r"[\s'\"{}\[\]$()|<>;&*]", w) else w for w in words)
                if cmd.startswith("--set"):  # docs/config.md's override examples: on the comm-bench job
                    cmd = "build/bin/switchyard run --config configs/comm-bench.yaml --set comm.ranks=2 " + cmd
                if cmd.startswith("switchyard launch"):  # docs/launch.md writes it as installed
                    cmd = "build/bin/" + cmd
                out.append((f"{os.path.relpath(path, source)}:{n}", cmd))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--build")
    a = ap.parse_args()
    source = os.path.realpath(a.source)
    build = os.path.realpath(a.build or os.path.join(source, "build"))
    scratch = tempfile.mkdtemp(prefix="sy-doc-commands-")
    env = dict(os.environ, OMPI_MCA_btl="self,vader", OMP_WAIT_POLICY="passive")
    env.pop("PYTHONPATH", None)  # each documented python command says where the module is

    def in_build(cmd):  # the docs' build/ is this build directory
        cmd = re.sub(r"(?<![\w/.-])build/", build + "/", cmd)
        return re.sub(r"(compare_alltoall\.sh) build\b", r"\1 " + build, cmd)

    failed = ran = skipped = 0

    def tree_state():  # what git sees in the source tree (none outside a checkout)
        try:
            return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=source,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return b""

    tree_before = tree_state()
    # What the docs assume exists: make run's checkpoint (README: "continue make run's model").
    if not a.list:
        setup = in_build(shrink("build/bin/switchyard run --config configs/quickstart.yaml --set train.steps=2", scratch))
        subprocess.run(["bash", "-c", setup], cwd=source, env=env, stdout=subprocess.DEVNULL, check=True, timeout=a.timeout)
    try:
        for where, cmd in doc_commands(source):
            if a.only and a.only not in cmd:
                continue
            small = in_build(shrink(cmd, scratch))
            reason = next((why for pattern, why in SKIP if re.search(pattern, small)), None)
            if reason or a.list:
                skipped += 1 if reason else 0
                print(f"skip          {where:24s} {small}" + (f"   ({reason})" if reason else ""), flush=True)
                continue
            start = time.monotonic()
            try:
                p = subprocess.run(["bash", "-c", small], cwd=source, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=a.timeout)
                code, text = p.returncode, p.stdout.decode(errors="replace")
            except subprocess.TimeoutExpired as e:
                code, text = "timeout", (e.stdout or b"").decode(errors="replace")
            seconds = time.monotonic() - start
            ran += 1
            ok = code == 0
            failed += 0 if ok else 1
            print(f"{'ok  ' if ok else 'FAIL'} {seconds:6.1f} s  {where:24s} {small}", flush=True)
            if not ok:
                print(f"     exit {code}; last lines:\n       " + "\n       ".join(text.strip().splitlines()[-8:]),
                      flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if tree_state() != tree_before:
        failed += 1
        print("FAIL the documented commands changed the source tree (git status differs): they must write "
              "only where the docs say, and the runner puts those outputs in its scratch directory")
    print(f"{ran - failed} of {ran} documented commands ran cleanly; {skipped} skipped (reasons above)")
    print("DOC_COMMANDS_OK" if failed == 0 else "DOC_COMMANDS_FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
