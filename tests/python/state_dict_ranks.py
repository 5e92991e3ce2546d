"""state_dict by logical expert across world sizes, and what only 2 ranks can show
(tests/python/check_torch_ddp.py runs it).

    state_dict_ranks.py save DIR    one process: DIR/full.pt (every expert) and DIR/y.pt (outputs for fixed x)
    state_dict_ranks.py load DIR    2 ranks: each loads full.pt (its own experts from it) and gives y;
                                    each saves its own state_dict, and loading the other rank's is refused;
                                    a rank whose x needs no gradient (an empty batch) beside one whose does;
                                    one expert sliced over both ranks: slice keys, its checkpoint, the norm
    state_dict_ranks.py check DIR   one process: the sliced expert's checkpoint loads whole, and its
                                    outputs and gradient norm are the 2 ranks'
"""
import os
import sys

import torch

import switchyard
from switchyard.torch import MoE, clip_grad_norm_, load_checkpoint, save_checkpoint

mode, work = sys.argv[1], sys.argv[2]
world = switchyard.init()
comm = world.communicator
torch.manual_seed(3)
x = torch.randn(24, 16)

def sliced(comm):
    """One expert over every rank (sliced): its loss's gradient norm, its output for x."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), MoE(comm, 16, 20, 1, k=1, capacity_factor=0.0, seed=2))
    per = x.shape[0] // comm.size
    mine = x[comm.rank * per:(comm.rank + 1) * per]
    y, _, _ = model[1](model[0](mine))
    (y.pow(2).sum() / x.shape[0]).backward()  # each rank's part of one global loss
    if comm.size > 1:
        for p in model[0].parameters():
            comm.allreduce(p.grad)
    norm = float(clip_grad_norm_(model, 1e9, comm))  # no clipping: the norm
    return model, y.detach(), norm


if mode == "check":
    model, y, norm = sliced(comm)
    saved = torch.load(os.path.join(work, "sliced.pt"))
    load_checkpoint(os.path.join(work, "sliced"), model)
    y_loaded = model[1](model[0](x))[0].detach()
    ok = float((y_loaded - saved["y"]).abs().max()) < 1e-5 and abs(norm - saved["norm"]) < 1e-5 * norm
    print(f"1 process: the 2-rank sliced expert's checkpoint gives y within {float((y_loaded - saved['y']).abs().max()):.1e}; "
          f"gradient norm {norm:.6f} here, {saved['norm']:.6f} on 2 ranks (b2 counted once)", flush=True)
    sys.exit(0 if ok else 1)
if mode == "save":
    moe = MoE(comm, 16, 20, 4, k=2, capacity_factor=0.0, seed=5)
    torch.save(moe.state_dict(), os.path.join(work, "full.pt"))
    torch.save(moe(x)[0].detach(), os.path.join(work, "y.pt"))
    sys.exit(0)
moe = MoE(comm, 16, 20, 4, k=2, capacity_factor=0.0, seed=9)  # other weights until loaded
moe.load_state_dict(torch.load(os.path.join(work, "full.pt")))  # strict: the other experts are not unexpected
per = x.shape[0] // comm.size
y = moe(x[comm.rank * per:(comm.rank + 1) * per])[0].detach()
want = torch.load(os.path.join(work, "y.pt"))[comm.rank * per:(comm.rank + 1) * per]
err = float((y - want).abs().max())
torch.save(moe.state_dict(), os.path.join(work, f"rank{comm.rank}.pt"))
comm.barrier()
other = torch.load(os.path.join(work, f"rank{1 - comm.rank}.pt"))
try:
    moe.load_state_dict(other)
    refused = ""
except RuntimeError as e:
    refused = str(e)
# The input gradient's all-to-all runs on both ranks even when only one rank's x needs a gradient.
xg = torch.randn(5, 16, requires_grad=True) if comm.rank == 0 else torch.zeros(0, 16)
y_mixed, balance, _ = moe(xg)
(y_mixed.sum() + 0.01 * balance).backward()
mixed_ok = comm.rank != 0 or (xg.grad is not None and bool(torch.isfinite(xg.grad).all()))

# One expert sliced over both ranks.
model, y_sliced, norm = sliced(comm)
keys = sorted(k for k in model.state_dict() if k.startswith("1.experts."))
slice_ok = keys == [f"1.experts.0.slice{comm.rank}of2.{n}" for n in ("b1", "b2", "w1", "w2")]
save_checkpoint(os.path.join(work, "sliced"), model, comm)
ys = torch.zeros(x.shape[0], 16)
ys[comm.rank * per:(comm.rank + 1) * per] = y_sliced
comm.allreduce(ys)
if comm.rank == 0:
    torch.save({"y": ys, "norm": norm}, os.path.join(work, "sliced.pt"))
print(f"rank {comm.rank}: mixed input gradients {'ok' if mixed_ok else 'WRONG'}; sliced state_dict keys {keys}",
      flush=True)
ok = err < 1e-6 and "but the state_dict has experts" in refused and mixed_ok and slice_ok
print(f"rank {comm.rank}: experts {moe.experts_here}, y from the 1-process state_dict differs by {err:.2e}; "
      f"the other rank's state_dict {'refused' if refused else 'LOADED'}: {refused.splitlines()[-1] if refused else ''}",
      flush=True)
sys.exit(0 if ok else 1)
