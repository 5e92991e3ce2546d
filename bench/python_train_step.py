"""A Python training step of the tiny LM (examples/tiny_lm/base.json: 8
layers, d 256, 8 experts; batch 16 x 128 bytes, one rank) against what its
parts cost on their own, measured in the same run, interleaved:

  full   zero_grad + forward + backward + Adam step of the model as trained
  dense  the same step with each MoE layer replaced by a stand-in of no cost
         (its output x * 0; the MoE parameters get zero gradients, so Adam's
         work is the same)
  moe    each MoE layer's forward + backward called from C++ (MoELayer.time_cpp)
         on the inputs that layer saw in the full step

and reports full / (dense + moe): the cost of running the MoE through
Python and autograd inside a real model (target <= 1.2). Medians of the
interleaved repeats; INCONCLUSIVE when the machine was too noisy to tell.

    PYTHONPATH=build/python OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive /usr/bin/python3 bench/python_train_step.py
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import switchyard

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "examples", "tiny_lm"))
import tinylm  # noqa: E402


class _Skip(torch.nn.Module):
    """Costs nothing: stands in for an MoE layer in the dense-only step."""

    def forward(self, x, **_):
        zero = x.new_zeros(())
        return x * 0, zero, zero


def spread(values):
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 / q1 if q1 > 0 else float("inf")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--limit", type=float, default=1.2)
    args = p.parse_args()
    world = switchyard.init()
    cfg = json.load(open(os.path.join(here, "..", "examples", "tiny_lm", "base.json")))
    train = cfg["train"]
    B, T = train["batch"], train["seq"]
    model = tinylm.TinyLM(cfg, world.communicator, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=train["lr"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (B, T), generator=g)
    target = torch.randint(0, 256, (B, T), generator=g)
    moes = model.moe_layers()
    seen = {}  # each MoE layer's input and output gradient in the last full step

    def capture(module, inputs, outputs):
        seen[id(module)] = [inputs[0].detach().clone(), None]
        outputs[0].register_hook(lambda grad: seen[id(module)].__setitem__(1, grad.detach().clone()))

    hooks = [m.register_forward_hook(capture) for m in moes]

    def step():
        optimizer.zero_grad()
        logits, balance = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), target.reshape(-1)) + 0.01 * balance
        loss.backward()
        optimizer.step()

    zeros = {id(p): torch.zeros_like(p) for m in moes for p in m.parameters()}

    def dense_step():
        for block in model.blocks:
            block.ffn, block.real_ffn = _Skip(), block.ffn
        try:
            optimizer.zero_grad()
            logits, balance = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), target.reshape(-1)) + 0.01 * balance
            loss.backward()
            for m in moes:
                for q in m.parameters():
                    q.grad = zeros[id(q)]
            optimizer.step()
        finally:
            for block in model.blocks:
                block.ffn = block.real_ffn
                del block.real_ffn

    def moe_cpp():
        return sum(m.layer.time_cpp(seen[id(m)][0], seen[id(m)][1].contiguous(), 1, "dropless") for m in moes)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(2):
        step()
        dense_step()
    full, dense, moe = [], [], []
    for i in range(args.repeats):  # interleaved: drifts of a shared machine hit all three alike
        full.append(timed(step))
        dense.append(timed(dense_step))
        moe.append(moe_cpp())
        print(f"  repeat {i + 1}/{args.repeats}: full {full[-1] * 1e3:.1f} ms, dense {dense[-1] * 1e3:.1f} ms, "
              f"moe (C++) {moe[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    for h in hooks:
        h.remove()
    mf, md, mm = statistics.median(full), statistics.median(dense), statistics.median(moe)
    ratio = mf / (md + mm)
    noisy = max(spread(full), spread(dense), spread(moe))
    if noisy > 1.3:
        verdict = f"INCONCLUSIVE (the repeats' quartiles spread {noisy:.2f}x)"
    elif ratio < 0.9:
        verdict = f"INCONCLUSIVE (the full step beat the sum of its parts by {1 / ratio:.2f}x)"
    else:
        verdict = "OK" if ratio <= args.limit else "OVER"
    print(f"tiny LM base ({cfg['layers']} layers, d {cfg['d_model']}, {cfg['ffn']['experts']} experts, top-"
          f"{cfg['ffn']['k']}), batch {B} x {T}, 1 rank, {torch.get_num_threads()} torch thread(s), "
          f"{switchyard.gemm_threads()} GEMM thread(s)")
    print(f"full step {mf * 1e3:.1f} ms   dense parts {md * 1e3:.1f} ms   MoE layers from C++ {mm * 1e3:.1f} ms   "
          f"full / (dense + moe) = {ratio:.3f} (limit {args.limit})  {verdict}")


if __name__ == "__main__":
    main()
