"""A small transformer whose FFN is a switchyard MoE, trained from PyTorch:
DDP for the dense parts, expert parallelism for the experts, Adam, and a
checkpoint that reloads at another world size.

    python3 examples/torch_moe/train.py                                   # one process
    switchyard launch --nprocs 2 -- python3 examples/torch_moe/train.py   # 2 ranks (UCX), torch on gloo
    torchrun --nproc_per_node 2 examples/torch_moe/train.py               # the same under torchrun
    mpirun -np 2 python3 examples/torch_moe/train.py --sync manual        # mpi; gradients synced by hand

    ... --steps 20 --save /tmp/ckpt          # then, at any world size:
    python3 examples/torch_moe/train.py --resume /tmp/ckpt --steps 40

The task: sequences that step through a 32-token ring by a per-sequence
stride; the next token is predictable after two. Each step's global batch is
drawn from the step number and split over the ranks, and routing is
dropless, so the losses do not depend on the world size. Prints one line per
step: "step N loss L".
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import switchyard
from switchyard.torch import MoE, allreduce_gradients, clip_grad_norm_, load_checkpoint, save_checkpoint

VOCAB, SEQ, DIM, HIDDEN, EXPERTS, BATCH = 32, 16, 32, 64, 4, 8


class Block(torch.nn.Module):
    def __init__(self, group, expert_data_parallel_group=None):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.attn = torch.nn.MultiheadAttention(DIM, 4, batch_first=True)
        # Expert-parallel: EXPERTS / world experts on each rank; the gate is replicated.
        self.moe = MoE(group, DIM, HIDDEN, EXPERTS, k=2, capacity_factor=0.0, seed=1,
                       expert_data_parallel_group=expert_data_parallel_group)
        # Float, not bool: DDP broadcasts buffers, and gloo has no bool.
        self.register_buffer("causal", torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1), persistent=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=self.causal, need_weights=False)[0]
        y, balance, _ = self.moe(self.norm2(x))  # [B, T, DIM] in, [B, T, DIM] out
        return x + y, balance


class TinyLM(torch.nn.Module):
    def __init__(self, group, expert_data_parallel_group=None):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Parameter(torch.zeros(SEQ, DIM))
        self.block = Block(group, expert_data_parallel_group)
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x, balance = self.block(self.embed(tokens) + self.pos)
        return self.head(self.norm(x)), balance


def batch(step, rank, world):
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    per = BATCH // world
    mine = seq[rank * per:(rank + 1) * per]
    return mine[:, :-1], mine[:, 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sync", choices=("ddp", "manual", "torch-ddp-unprepared"), default="ddp",
                    help="ddp: switchyard.torch.DistributedDataParallel; manual: allreduce_gradients; "
                         "torch-ddp-unprepared: torch's DDP as is (refused: it would corrupt the experts)")
    ap.add_argument("--expert_parallel", type=int, default=0,
                    help="ranks per expert group (Megatron's expert_model_parallel_size; default: all): the "
                         "experts are split over each group and replicated across groups, whose expert "
                         "gradients are summed over the expert-data-parallel group")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    ap.add_argument("--save", help="checkpoint directory written after the last step")
    ap.add_argument("--resume", help="checkpoint directory to continue from (any world size)")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-3 for adam, 0.5 for sgd")
    ap.add_argument("--balance_coef", type=float, default=0.01,
                    help="weight of the balance loss (each rank's is over its own tokens, so with it the losses "
                         "depend slightly on the world size)")
    args = ap.parse_args()

    world = switchyard.init()  # mpi under mpirun, ucx under switchyard launch / torchrun, else one rank
    comm = world.communicator
    if BATCH % comm.size:
        raise SystemExit(f"{comm.size} ranks do not divide the batch of {BATCH}")
    ep = args.expert_parallel or comm.size
    if comm.size % ep:
        raise SystemExit(f"--expert_parallel {ep} does not divide {comm.size} ranks")
    # Expert groups: consecutive ranks; the expert-data-parallel groups: the same position in each.
    expert_group = comm.split(color=comm.rank // ep, key=comm.rank)
    edp_group = comm.split(color=comm.rank % ep, key=comm.rank) if ep < comm.size else None
    torch.manual_seed(0)  # the same dense initialisation on every rank
    model = TinyLM(expert_group, edp_group)
    if args.sync != "manual":
        if "MASTER_ADDR" in os.environ:  # switchyard launch and torchrun give torch its own MASTER_PORT
            dist.init_process_group("gloo", rank=world.rank, world_size=world.size)
        elif comm.size > 1:
            raise SystemExit(f"--sync {args.sync} on {comm.size} ranks needs torch.distributed's MASTER_ADDR and "
                             "MASTER_PORT (switchyard launch and torchrun set them; under mpirun export them, or "
                             "use --sync manual)")
        else:
            dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        if args.sync == "ddp":
            model = switchyard.torch.DistributedDataParallel(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr or 3e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr or 0.5)
    first = 0
    if args.resume:
        first = load_checkpoint(args.resume, core, optimizer)["step"]
    for step in range(first, args.steps):
        tokens, target = batch(step, comm.rank, comm.size)
        optimizer.zero_grad()
        logits, balance = model(tokens)
        # Each rank's loss is the mean over its own sequences (DDP's convention).
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)) + args.balance_coef * balance
        loss.backward()
        if args.sync == "manual":
            allreduce_gradients(core, comm, average=True)
        # The whole model's norm, every expert once, so every rank clips alike.
        norm = clip_grad_norm_(core, args.clip, comm) if args.clip > 0 else torch.zeros(())
        optimizer.step()
        total = loss.detach().reshape(1).clone()
        comm.allreduce(total)
        if comm.rank == 0:
            print(f"step {step + 1} loss {float(total) / comm.size:.7f} gradient norm {float(norm):.5f}", flush=True)
    if args.save:
        save_checkpoint(args.save, core, comm, optimizer, metadata={"step": args.steps})
        if comm.rank == 0:
            print(f"saved {args.save} at step {args.steps} on {comm.size} rank(s)", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
