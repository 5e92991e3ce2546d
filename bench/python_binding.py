"""Overhead of the Python binding per MoE forward + backward at the tiny-LM
shapes: switchyard.torch.MoE through autograd against the same C++ calls in a
C++ loop (MoELayer.time_cpp), medians of interleaved runs in one process.

    PYTHONPATH=build/python OMP_NUM_THREADS=1 /usr/bin/python3 bench/python_binding.py
"""
import argparse
import statistics
import time

import torch

import switchyard
from switchyard.torch import MoE


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="16 x 128 bytes: the tiny LM's batch on one rank")
    p.add_argument("--model_dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    world = switchyard.init()
    torch.manual_seed(0)
    moe = MoE(world.communicator, args.model_dim, args.hidden, args.experts, k=2, capacity_factor=0.0)
    x = torch.randn(args.tokens, args.model_dim, requires_grad=True)
    g = torch.randn(args.tokens, args.model_dim)

    def python_step():
        x.grad = None
        for q in moe.parameters():
            q.grad = None
        y, balance, _ = moe(x, exchange="padded")
        torch.autograd.backward([y, balance], [g, torch.tensor(0.01)])

    for _ in range(3):
        python_step()
    py, cpp = [], []
    for _ in range(args.repeats):  # interleaved, so drifts of this shared machine hit both alike
        t = time.perf_counter()
        python_step()
        py.append(time.perf_counter() - t)
        cpp.append(moe.layer.time_cpp(x.detach(), g, 1, "padded"))
    mp, mc = statistics.median(py), statistics.median(cpp)
    overhead = mp - mc
    limit = max(0.10 * mc, 50e-6)
    print(f"tokens {args.tokens}, d_model {args.model_dim}, hidden {args.hidden}, {args.experts} experts, top-2, 1 rank")
    verdict = judge(py, cpp, limit)
    print(f"python (autograd) {mp * 1e3:.3f} ms   c++ {mc * 1e3:.3f} ms   overhead {overhead * 1e6:.0f} us "
          f"({100 * overhead / mc:.1f}% of the step; limit {limit * 1e6:.0f} us)  {verdict}")


def judge(py, cpp, limit):
    """OK / OVER, or INCONCLUSIVE when the machine was too noisy to tell: the
    C++ baseline's runs spread by more than 1.3x between their quartiles, or
    Python (which runs the same C++ step plus autograd) came out more than 10%
    faster than the C++ step alone, which no binding can do."""
    mp, mc = statistics.median(py), statistics.median(cpp)
    q1, _, q3 = statistics.quantiles(cpp, n=4)
    if q1 <= 0 or q3 / q1 > 1.3:
        return f"INCONCLUSIVE (the C++ runs' quartiles spread {q3 / q1:.2f}x)" if q1 > 0 else "INCONCLUSIVE"
    if mp - mc < -0.10 * mc:
        return f"INCONCLUSIVE (python {mp * 1e3:.3f} ms beat the C++ step it wraps, {mc * 1e3:.3f} ms)"
    return "OK" if mp - mc <= limit else "OVER"


if __name__ == "__main__":
    main()
