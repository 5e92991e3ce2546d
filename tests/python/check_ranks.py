"""Runs train_steps.py on one process, under mpirun -np 2, and (given the
switchyard binary as an argument) under `switchyard launch --nprocs 2` (the
UCX backend, bootstrapped through the TCP store); the losses must agree."""
import os
import re
import subprocess
import sys

try:
    import torch  # noqa: F401
except ImportError:
    print("python3-torch is absent: the 1 vs 2 ranks check is skipped")
    sys.exit(0)

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(here, "train_steps.py")
python = sys.executable
env = dict(os.environ, OMPI_MCA_btl="self,vader")
mpirun = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def losses(cmd):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    found = [float(v) for v in re.findall(r"loss ([0-9.e+-]+)", out.stdout)]
    if len(found) != 5:
        sys.exit(f"expected 5 losses from {' '.join(cmd)}, got:\n{out.stdout}")
    return found


one = losses([python, script])
runs = {"2 ranks (mpirun)": losses(mpirun + ["-x", "PYTHONPATH", python, script])}
if len(sys.argv) > 1:
    runs["2 ranks (switchyard launch, ucx)"] = losses([sys.argv[1], "launch", "--nprocs", "2", "--", python, script])
print(f"{'1 rank':32s}:", " ".join(f"{v:.7f}" for v in one))
for name, values in runs.items():
    print(f"{name:32s}:", " ".join(f"{v:.7f}" for v in values))
if one[-1] >= one[0]:
    sys.exit("the loss did not fall over 5 steps")
worst = max(abs(a - b) / max(abs(a), 1e-12) for values in runs.values() for a, b in zip(one, values))
print(f"largest relative difference {worst:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
