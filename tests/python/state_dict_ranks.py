"""state_dict by logical expert across world sizes (tests/python/check_torch_ddp.py runs it).

    state_dict_ranks.py save DIR    one process: DIR/full.pt (every expert) and DIR/y.pt (outputs for fixed x)
    state_dict_ranks.py load DIR    2 ranks: each loads full.pt (its own experts from it) and gives y;
                                    each saves its own state_dict, and loading the other rank's is refused
"""
import os
import sys

import torch

import switchyard
from switchyard.torch import MoE

mode, work = sys.argv[1], sys.argv[2]
world = switchyard.init()
comm = world.communicator
torch.manual_seed(3)
x = torch.randn(24, 16)
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
ok = err < 1e-6 and "but the state_dict has experts" in refused
print(f"rank {comm.rank}: experts {moe.experts_here}, y from the 1-process state_dict differs by {err:.2e}; "
      f"the other rank's state_dict {'refused' if refused else 'LOADED'}: {refused.splitlines()[-1] if refused else ''}",
      flush=True)
sys.exit(0 if ok else 1)
