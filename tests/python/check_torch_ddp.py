"""examples/torch_moe/train.py (a transformer with a switchyard MoE FFN) on 1
and 2 ranks: DDP for the dense parts and expert-parallel experts give the
losses of one process holding every expert; DDP gives the losses of the
hand-written gradient sync; a checkpoint saved on 2 ranks resumes on 1 and
continues the 2-rank run; torch's DDP without prepare_ddp is refused with
the fix named. Two launchers: `switchyard launch` (which keeps its store's
port and gives torch MASTER_PORT) and torchrun's variables set by hand with
nothing hosting Switchyard's store (rank 0 hosts it at MASTER_PORT + 1,
beside torch's store at MASTER_PORT). Debian's torchrun itself fails at
start on Python 3.11 (torch 1.13's elastic agent), so it is not run here.

usage: check_torch_ddp.py SWITCHYARD_BINARY
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

try:
    import torch  # noqa: F401
except ImportError:
    print("python3-torch is absent: the DDP check is skipped")
    sys.exit(0)

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(here, "..", "..", "examples", "torch_moe", "train.py")
python = sys.executable
switchyard = sys.argv[1]
base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHYARD_STORE", "MASTER_", "RANK",
                                                                      "WORLD_SIZE", "LOCAL_"))}
failures = []


def losses(text, cmd):
    found = [float(v) for v in re.findall(r"step \d+ loss ([0-9.e+-]+)", text)]
    if not found:
        sys.exit(f"no losses from {' '.join(cmd)}:\n{text}")
    return found


def run(cmd, expect_ok=True, env=None):
    out = subprocess.run(cmd, env=env or base_env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    if expect_ok and out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{text}")
    return out.returncode, text


def one(*args):
    cmd = [python, script, *args]
    return losses(run(cmd)[1], cmd)


def run_launch(nprocs, *args):
    cmd = [switchyard, "launch", "--nprocs", str(nprocs), "--", python, script, *args]
    return losses(run(cmd)[1], cmd)


def launch(*args):
    return run_launch(2, *args)


def torchrun_by_hand(*args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(base_env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([python, script, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    texts = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, texts)):
        if p.returncode != 0:
            sys.exit(f"torchrun-style rank {rank} failed ({p.returncode}):\n{text}")
    return losses(texts[0], ["torchrun-style", *args])


def agree(name, a, b, tol):
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    ok = len(a) == len(b) and worst < tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: largest relative difference {worst:.2e} (limit {tol:g})")
    print("       " + " ".join(f"{v:.7f}" for v in a))
    print("       " + " ".join(f"{v:.7f}" for v in b))
    if not ok:
        failures.append(name)


# SGD, clipping and no balance loss: a wrong gradient scale or norm shows (Adam would hide a scale), and each rank's
# balance loss is over its own tokens, so with it the losses depend slightly on the world size.
sgd = ["--steps", "4", "--optimizer", "sgd", "--balance_coef", "0", "--clip", "0.7"]  # clipping at most steps
reference = one(*sgd, "--sync", "manual")
if reference[-1] >= reference[0]:
    failures.append("the loss did not fall")
agree("1 process vs 2 ranks with DDP (switchyard launch)", reference, launch(*sgd, "--sync", "ddp"), 1e-5)
agree("1 process vs 2 ranks with DDP (torchrun's variables, rank 0 hosts the store)", reference,
      torchrun_by_hand(*sgd, "--sync", "ddp"), 1e-5)
agree("1 process vs 2 ranks with the hand-written sync", reference, launch(*sgd, "--sync", "manual"), 1e-5)
agree("1 process vs 2 ranks with DDP, expert groups of 1 rank (every expert on both, expert-data-parallel)",
      reference, launch(*sgd, "--sync", "ddp", "--expert_parallel", "1"), 1e-5)

agree("1 process vs 4 ranks: expert groups of 2 x 2 data-parallel replicas, DDP", reference,
      run_launch(4, *sgd, "--sync", "ddp", "--expert_parallel", "2"), 1e-5)

adam = ["--steps", "4"]
agree("DDP vs the hand-written sync (2 ranks, Adam, balance loss)", launch(*adam, "--sync", "manual"),
      launch(*adam, "--sync", "ddp"), 1e-6)

work = tempfile.mkdtemp()
try:
    straight = launch("--steps", "6", "--balance_coef", "0", "--sync", "ddp")
    launch("--steps", "3", "--balance_coef", "0", "--sync", "ddp", "--save", os.path.join(work, "ckpt"))
    resumed = one("--steps", "6", "--balance_coef", "0", "--sync", "manual", "--resume", os.path.join(work, "ckpt"))
    agree("saved on 2 ranks at step 3, resumed on 1 (Adam state included) vs 2 ranks straight", straight[3:],
          resumed, 1e-5)
    launch("--steps", "3", "--balance_coef", "0", "--sync", "ddp", "--expert_parallel", "1",
           "--save", os.path.join(work, "replicated"))
    resumed = launch("--steps", "6", "--balance_coef", "0", "--sync", "ddp", "--resume", os.path.join(work, "replicated"))
    agree("saved with every expert on both ranks (expert groups of 1), resumed with experts split over 2 vs "
          "straight", straight[3:], resumed, 1e-5)
finally:
    shutil.rmtree(work, ignore_errors=True)

# state_dict by logical expert: one process's loads on 2 ranks (each takes its own experts); a rank's own
# refuses to load on the other (before: a same-shaped load put the wrong experts in place).
sd_script = os.path.join(here, "state_dict_ranks.py")
work = tempfile.mkdtemp()
try:
    run([python, sd_script, "save", work])
    code, text = run([switchyard, "launch", "--nprocs", "2", "--", python, sd_script, "load", work], expect_ok=False)
    if code == 0:
        code, more = run([python, sd_script, "check", work], expect_ok=False)
        text += more
    print(("ok   " if code == 0 else "FAIL ") + "state_dict across ranks, mixed input gradients, a sliced expert:\n"
          + text.strip())
    if code != 0:
        failures.append("state_dict across ranks")
finally:
    shutil.rmtree(work, ignore_errors=True)

code, text = run([switchyard, "launch", "--nprocs", "2", "--", python, script, "--steps", "2",
                  "--sync", "torch-ddp-unprepared"], expect_ok=False)
refused = code != 0 and "without switchyard.torch.prepare_ddp(model)" in text and "block.moe.w1" in text
print(f"{'ok  ' if refused else 'FAIL'} torch's DDP without prepare_ddp is refused (exit {code})")
if not refused:
    print(text)
    failures.append("unprepared DDP")
sys.exit(1 if failures else 0)
