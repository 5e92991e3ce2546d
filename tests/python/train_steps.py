"""5 SGD steps of a small MoE regression on however many ranks the launcher
gives (mpirun -np 2, or one process); prints one loss per step. Each rank
takes its block of the same global batch, and the loss is the global mean,
so the losses must not depend on the number of ranks (dropless routing).
"""
import sys

import torch

import switchyard
from switchyard.torch import MoE

world = switchyard.init()
comm = world.communicator
torch.manual_seed(0)
T, M, H, E = 48, 16, 24, 4
x_all = torch.randn(T, M)
teacher = torch.randn(M, M) / M ** 0.5
target_all = torch.tanh(x_all @ teacher)
per = T // comm.size
x, target = x_all[comm.rank * per:(comm.rank + 1) * per], target_all[comm.rank * per:(comm.rank + 1) * per]

# The collectives on torch tensors across the ranks.
ranks = torch.full((comm.size,), -1.0)
comm.allgather(torch.tensor([float(comm.rank)]), ranks)
assert ranks.tolist() == [float(r) for r in range(comm.size)], ranks
blocks = torch.full((comm.size,), float(comm.rank))
back = torch.empty(comm.size)
comm.alltoall(blocks, back)
assert back.tolist() == [float(r) for r in range(comm.size)], back

moe = MoE(comm, M, H, E, k=2, capacity_factor=0.0, seed=7)
for step in range(5):
    y, balance, _ = moe(x, exchange="dropless")
    loss = ((y - target) ** 2).sum() / T
    for p in moe.parameters():
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in moe.parameters():
            p -= 0.5 * p.grad  # the gate's gradient is already summed over the ranks
    total = loss.detach().clone().reshape(1)
    comm.allreduce(total)
    if comm.rank == 0:
        print(f"step {step} loss {float(total):.9f}", flush=True)
