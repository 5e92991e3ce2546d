"""One training step's gradients of the PyTorch tiny LM (examples/tiny_lm/tinylm.py), for the C++ model.

    PYTHONPATH=build/python OMP_NUM_THREADS=1 /usr/bin/python3 tests/python/torch_lm_grads.py OUT.safetensors [SEED]

Builds a small TinyLM on one rank, draws a random batch of bytes, computes the
training loss exactly as examples/tiny_lm/train.py does (summed cross-entropy
over the global target count plus balance_coef times the balance loss), runs
backward, and writes every parameter under its checkpoint name
(tinylm.state_tensors: experts stacked [E, ...]), its gradient under
"grad.<name>", the batch ("tokens", "targets": int32 [B, T]) and the loss
("loss": float32 [1]). tests/multirank/train_test.cpp
(LmTrain.GradientsMatchThePyTorchModel) loads these weights into
TrainableLM and compares its gradients: the MoE FFNs are the same C++ layer
on both sides, so what this checks is the dense parts (embedding, RMSNorms,
rotary attention, head, cross-entropy) of model/lm_train.cpp against torch
autograd.
"""
import json
import os
import random
import sys

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "examples", "tiny_lm"))
import tinylm  # noqa: E402  (first: it finds the switchyard module of a checkout's build/python)
import switchyard  # noqa: E402

CONFIG = {
    "name": "torch-grads",
    "vocab_size": 256,
    "d_model": 32,
    "layers": 2,
    "heads": 4,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_seq": 16,
    "ffn": {"experts": 4, "k": 2, "hidden": 24, "activation": "gelu", "gate": "softmax", "renormalize": False},
}
B, T = 3, 7
BALANCE_COEF = 0.3


def main():
    if len(sys.argv) not in (2, 3):
        raise SystemExit(f"usage: {sys.argv[0]} OUT.safetensors [SEED]")
    out = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) == 3 else random.SystemRandom().randrange(1, 2**31)
    print(f"seed {seed}", flush=True)
    torch.set_default_dtype(torch.float32)
    world = switchyard.init()
    comm = world.communicator
    if comm.size != 1:
        raise SystemExit(f"run on one rank (got {comm.size})")
    model = tinylm.TinyLM(CONFIG, comm, seed)
    V = CONFIG["vocab_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    # The RMSNorm weights start at one; other values, so a backward that mixes up x and w shows.
    with torch.no_grad():
        for norm in [model.norm] + [n for b in model.blocks for n in (b.attn_norm, b.ffn_norm)]:
            norm.weight.copy_(1 + 0.25 * torch.randn(norm.weight.shape, generator=gen))
    x = torch.randint(0, V, (B, T), generator=gen)
    y = torch.randint(0, V, (B, T), generator=gen)

    # examples/tiny_lm/train.py's loss, one rank.
    logits, balance = model(x)
    ce_sum = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")
    loss = ce_sum / (B * T) + BALANCE_COEF / comm.size * balance
    model.zero_grad(set_to_none=False)
    loss.backward()

    params = tinylm.state_tensors(model, comm)
    grads = {"embed.weight": model.embed.grad, "norm.weight": model.norm.weight.grad,
             "lm_head.weight": model.lm_head.grad}
    for i, b in enumerate(model.blocks):
        p = f"layers.{i}."
        grads[p + "attn_norm.weight"] = b.attn_norm.weight.grad
        for w in ("wq", "wk", "wv", "wo"):
            grads[p + "attn." + w] = getattr(b.attn, w).grad
        grads[p + "ffn_norm.weight"] = b.ffn_norm.weight.grad
        grads[p + "ffn.gate.weight"] = b.ffn.gate_weight.grad
        for name in ("w1", "b1", "w2", "b2"):  # one rank: the layer's slots are all E experts, in logical order
            grads[p + "ffn.experts." + name] = getattr(b.ffn, name).grad
    if set(grads) != set(params):
        raise SystemExit(f"gradient names {sorted(grads)} != parameter names {sorted(params)}")

    tensors = {}
    for name, value in params.items():
        g = grads[name]
        if g is None:
            raise SystemExit(f"{name}: no gradient")
        if tuple(g.shape) != tuple(value.shape):
            raise SystemExit(f"{name}: gradient {tuple(g.shape)} vs parameter {tuple(value.shape)}")
        tensors[name] = value.detach().float().contiguous()
        tensors["grad." + name] = g.detach().float().contiguous()
    tensors["tokens"] = x.to(torch.int32)
    tensors["targets"] = y.to(torch.int32)
    tensors["loss"] = loss.detach().float().reshape(1)
    tinylm.save_safetensors(out, tensors, {
        "balance_coef": BALANCE_COEF, "seed": seed, "config": json.dumps(CONFIG),
        "ce_sum": float(ce_sum), "balance": float(balance)})
    print(f"loss {float(loss):.6f} (ce_sum {float(ce_sum):.4f}, balance {float(balance):.6f}); "
          f"wrote {len(tensors)} tensors to {out}", flush=True)


if __name__ == "__main__":
    main()
