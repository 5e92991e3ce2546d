"""Routing traces of a trained tiny LM on held-out text (format: README.md).

    /usr/bin/python3 examples/tiny_lm/trace.py --model base     # -> trace/base_heldout.safetensors
    build/bin/switchyard trace stats examples/tiny_lm/trace/base_heldout.safetensors
"""
import argparse
import json
import os

import torch

import tinylm  # first: it finds the switchyard module of a checkout's build/python
import switchyard

here = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["base", "draft"], default="base")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out bytes traced (windows of 128)")
    args = parser.parse_args()
    world = switchyard.init()
    comm = world.communicator
    cfg = json.load(open(os.path.join(here, args.model, "config.json")))
    model = tinylm.TinyLM(cfg, comm, seed=0)
    tinylm.load_into(model, tinylm.load_safetensors(os.path.join(here, args.model, "model.safetensors")), comm)
    _, held = tinylm.corpus()
    seq = 128
    buf = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
    windows = min(args.tokens // seq, (len(buf) - 1) // seq)
    tokens, positions = [], []
    experts = [[] for _ in model.moe_layers()]
    weights = [[] for _ in model.moe_layers()]
    with torch.no_grad():
        for start in range(0, windows, 16):
            idx = range(start, min(windows, start + 16))
            x = torch.stack([buf[j * seq:(j + 1) * seq] for j in idx])
            model(x)
            tokens.append(x.reshape(-1))
            positions.append(torch.arange(seq).repeat(len(idx)))
            for i, moe in enumerate(model.moe_layers()):
                e, w = moe.layer.last_choices()
                experts[i].append(torch.utils.dlpack.from_dlpack(e))
                weights[i].append(torch.utils.dlpack.from_dlpack(w))
    out = {"tokens": torch.cat(tokens).int(), "positions": torch.cat(positions).int()}
    for i in range(len(experts)):
        out[f"layer{i}.experts"] = torch.cat(experts[i]).int()
        out[f"layer{i}.weights"] = torch.cat(weights[i]).float()
    if comm.rank == 0:
        os.makedirs(os.path.join(here, "trace"), exist_ok=True)
        path = os.path.join(here, "trace", f"{args.model}_heldout.safetensors")
        tinylm.save_safetensors(path, out, {
            "format": "switchyard-routing-trace-v1", "model": args.model, "layers": len(experts),
            "k": cfg["ffn"]["k"], "experts": cfg["ffn"]["experts"],
            "text": "held-out fortunes (every 10th fortune of the Debian package fortunes), windows of 128 bytes"})
        print(f"wrote {path}: {out['tokens'].numel()} tokens x {len(experts)} layers")


if __name__ == "__main__":
    main()
