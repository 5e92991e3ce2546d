"""Trains the tiny MoE language models with expert parallelism.

    mpirun -np 2 /usr/bin/python3 examples/tiny_lm/train.py            # base and draft
    /usr/bin/python3 examples/tiny_lm/train.py --model draft --steps 50 # one rank, a short run

Each rank holds experts/ranks experts of every MoE layer; the other
parameters are replicated and their gradients summed over the ranks (the
loss is the global mean). Writes, per model, examples/tiny_lm/<name>/:
config.json, model.safetensors (bf16 weights), reference_logits.safetensors
(logits of the fixed prompt under those weights) and train_log.json.
Deterministic for a given number of ranks (fixed seeds, one thread per rank).
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import tinylm  # first: it finds the switchyard module of a checkout's build/python
import switchyard

here = os.path.dirname(os.path.abspath(__file__))


def evaluate(model, data, comm, seq, sequences):
    """Mean cross-entropy (nats/byte) over the first `sequences` non-overlapping windows of data."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = min(sequences, (len(buf) - 1) // seq)
    mine = list(range(comm.rank, n, comm.size))
    total = torch.zeros(2)
    with torch.no_grad():
        for i in range(0, len(mine), 8):
            idx = mine[i:i + 8]
            x = torch.stack([buf[j * seq:(j + 1) * seq] for j in idx])
            y = torch.stack([buf[j * seq + 1:(j + 1) * seq + 1] for j in idx])
            logits, _ = model(x)
            total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total[1] += y.numel()
        # Ranks with fewer windows still join every MoE all-to-all: pad with empty batches.
        rounds = math.ceil(math.ceil(n / comm.size) / 8) - math.ceil(len(mine) / 8)
        for _ in range(rounds):
            model(torch.zeros(0, seq, dtype=torch.long))
    comm.allreduce(total)
    return float(total[0] / total[1])


def train(name, steps_override, comm, log, out_root):
    cfg = json.load(open(os.path.join(here, f"{name}.json")))
    tc = cfg["train"]
    steps = steps_override or tc["steps"]
    model = tinylm.TinyLM(cfg, comm, tc["seed"])
    replicated = model.replicated_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    train_bytes, held = tinylm.corpus()
    unigram = tinylm.unigram_cross_entropy(train_bytes, held)
    gen = torch.Generator().manual_seed(tc["seed"])  # the same global batches on every rank
    B, T, V = tc["batch"], tc["seq"], cfg["vocab_size"]
    if B % comm.size:
        raise SystemExit(f"batch {B} is not divisible by the {comm.size} ranks")
    per = B // comm.size
    params = sum(p.numel() for p in replicated) + sum(
        p.numel() * comm.size for m in model.moe_layers() for p in (m.w1, m.b1, m.w2, m.b2)) + sum(
        m.gate_weight.numel() for m in model.moe_layers())
    log(f"[{name}] {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['ffn']['experts']} experts top-{cfg['ffn']['k']}, "
        f"{params / 1e6:.2f} M parameters; {comm.size} rank(s), {steps} steps of {B} x {T} bytes; "
        f"unigram baseline {unigram:.3f} nats/byte on held-out")
    history = []
    start = time.time()
    for step in range(steps):
        lr = tc["lr"] * min(1.0, (step + 1) / tc["warmup"]) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = tinylm.batch_of(train_bytes, B, T, gen)
        x, y = x[comm.rank * per:(comm.rank + 1) * per], y[comm.rank * per:(comm.rank + 1) * per]
        logits, balance = model(x)
        ce_sum = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")
        loss = ce_sum / (B * T) + tc["balance_coef"] / comm.size * balance
        opt.zero_grad(set_to_none=False)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        comm.allreduce(flat)  # experts are local; the MoE gate's gradient is summed inside the layer
        offset = 0
        for p in replicated:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
        total = ce_sum.detach().reshape(1).clone()
        comm.allreduce(total)
        history.append(float(total) / (B * T))
        if step % 25 == 0 or step == steps - 1:
            rate = (step + 1) * B * T / (time.time() - start)
            log(f"[{name}] step {step:4d}  loss {history[-1]:.3f}  lr {lr:.2e}  {rate:,.0f} bytes/s  "
                f"{time.time() - start:6.0f} s")
    train_seconds = time.time() - start
    held_loss = evaluate(model, held, comm, T, 512)
    # The released weights are bf16; everything below (held-out loss, reference logits) uses them.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    held_bf16 = evaluate(model, held, comm, T, 512)
    log(f"[{name}] trained in {train_seconds:.0f} s; held-out {held_loss:.3f} nats/byte "
        f"({held_bf16:.3f} with bf16 weights) vs unigram {unigram:.3f}")
    prompt = torch.tensor(list(tinylm.PROMPT)).view(1, -1)
    with torch.no_grad():
        ref_logits, _ = model(prompt)
    tensors = tinylm.state_tensors(model, comm)  # collective: every rank gathers the experts
    if comm.rank == 0:
        out = os.path.join(out_root, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({k: v for k, v in cfg.items() if k != "train"}, f, indent=2)
        tinylm.save_safetensors(os.path.join(out, "model.safetensors"),
                                {k: v.bfloat16() for k, v in tensors.items()},
                                {"format": "switchyard-tiny-lm-v1", "model": name})
        tinylm.save_safetensors(os.path.join(out, "reference_logits.safetensors"),
                                {"prompt": prompt[0].int(), "logits": ref_logits[0].float()},
                                {"prompt": tinylm.PROMPT.decode()})
        with open(os.path.join(out, "train_log.json"), "w") as f:
            json.dump({"ranks": comm.size, "steps": steps, "batch": B, "seq": T, "train_seconds": round(train_seconds, 1),
                       "heldout_nats_per_byte": round(held_loss, 4), "heldout_bf16_nats_per_byte": round(held_bf16, 4),
                       "unigram_nats_per_byte": round(unigram, 4), "parameters": params,
                       "loss_every_25_steps": [round(v, 4) for v in history[::25]]}, f, indent=1)
        log(f"[{name}] wrote {out}/")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["base", "draft", "deep_draft", "both"], default="both",
                        help="both: base and draft; deep_draft: the 12-layer draft for layer-parallel drafting")
    parser.add_argument("--steps", type=int, default=0, help="override the config's step count")
    parser.add_argument("--out", default=here, help="where the model folders go (default: beside this script)")
    args = parser.parse_args()
    world = switchyard.init()
    threads = max(1, (os.cpu_count() or 1) // max(1, world.local_size))
    torch.set_num_threads(threads)
    switchyard.set_gemm_threads(threads)
    torch.manual_seed(0)

    def log(msg):
        if world.rank == 0:
            print(msg, flush=True)

    for name in (["base", "draft"] if args.model == "both" else [args.model]):
        train(name, args.steps, world.communicator, log, args.out)


if __name__ == "__main__":
    main()
