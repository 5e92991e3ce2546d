"""switchyard.torch.MoE against a pure-PyTorch MoE with the same weights.

Run with Debian's interpreter: PYTHONPATH=build/python /usr/bin/python3 -m unittest tests/python/test_moe_torch.py
"""
import math
import os
import random
import unittest
import warnings

try:
    import torch
except ImportError:  # pragma: no cover - reported, not hidden
    torch = None

if torch is not None:
    import switchyard
    from switchyard.torch import MoE


def reference(x, gate_w, w1, b1, w2, b2, k, capacity_factor, activation, balance_coef):
    """y and balance loss of a GShard MoE in plain PyTorch (all experts local, float64)."""
    T, _ = x.shape
    E = gate_w.shape[1]
    probs = torch.softmax(x @ gate_w, dim=1)
    top_w, top_e = torch.topk(probs, k, dim=1)
    load = torch.bincount(top_e.flatten(), minlength=E)
    if capacity_factor > 0:
        capacity = k * math.ceil(capacity_factor * T / E)
    else:
        capacity = int(load.max()) if T else 0
    used = [0] * E
    y = torch.zeros_like(x)
    for j in range(k):  # GShard order: all first choices, then all second ones
        for t in range(T):
            e = int(top_e[t, j])
            if used[e] >= capacity:
                continue
            used[e] += 1
            pre = x[t] @ w1[e] + b1[e]
            if activation == "gelu":
                h = torch.nn.functional.gelu(pre)
            else:
                H = pre.shape[0] // 2
                h = torch.nn.functional.silu(pre[:H]) * pre[H:]
            y[t] = y[t] + top_w[t, j] * (h @ w2[e] + b2[e])
    f = load.to(x.dtype) / (T * k)
    balance = E * (f * probs.mean(dim=0)).sum()
    return y, balance


@unittest.skipIf(torch is None, "python3-torch is absent: the PyTorch module tests are skipped")
class MoETorchTest(unittest.TestCase):
    def setUp(self):
        self.world = switchyard.world()
        self.seed = int(os.environ.get("SWITCHYARD_TEST_SEED", random.randrange(1 << 30)))
        torch.manual_seed(self.seed)

    def check_against_reference(self, activation, capacity_factor, tokens):
        M, H, E, k = 24, 20, 4, 2
        moe = MoE(self.world.communicator, M, H, E, k=k, activation=activation,
                  capacity_factor=capacity_factor, seed=self.seed)
        x = torch.randn(tokens, M, requires_grad=True)
        g = torch.randn(tokens, M)
        y, balance, z = moe(x)
        loss = (y * g).sum() + 0.01 * balance
        loss.backward()

        params = [p.detach().double().clone().requires_grad_() for p in
                  (moe.gate_weight, moe.w1, moe.b1, moe.w2, moe.b2)]
        xr = x.detach().double().clone().requires_grad_()
        yr, br = reference(xr, *params, k, capacity_factor, activation, 0.01)
        ((yr * g.double()).sum() + 0.01 * br).backward()

        def close(a, b, what, tol=1e-5):
            err = (a.double() - b).norm() / max(b.norm(), 1e-30)
            self.assertLess(float(err), tol, f"{what}: relative error {float(err):.2e} (seed {self.seed})")

        close(y, yr, "output")
        self.assertAlmostEqual(float(balance), float(br), delta=1e-5 * abs(float(br)) + 1e-7)
        close(x.grad, xr.grad, "dx")
        for p, r, name in zip((moe.gate_weight, moe.w1, moe.b1, moe.w2, moe.b2), params,
                              ("gate", "w1", "b1", "w2", "b2")):
            close(p.grad, r.grad, f"grad of {name}", 1e-4 if name == "gate" else 1e-5)

    def test_forward_backward_equal_reference_padded_with_drops(self):
        self.check_against_reference("gelu", 1.0, 61)

    def test_forward_backward_equal_reference_dropless_swiglu(self):
        self.check_against_reference("swiglu", 0.0, 37)

    def test_gradcheck_on_a_small_layer(self):
        # The C++ layer computes in float32 (it has no float64 path), so this is
        # gradcheck in float32 with step and tolerances to match: k = E (no
        # routing discontinuity) and dropless (no capacity discontinuity).
        moe = MoE(self.world.communicator, 6, 5, 2, k=2, activation="gelu", capacity_factor=0.0, seed=self.seed)
        x = torch.randn(5, 6, requires_grad=True)
        params = (moe.gate_weight, moe.w1, moe.b1, moe.w2, moe.b2)

        def f(x, *ps):
            y, balance, _ = moe(x)
            return y, balance

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not a double precision.*")
            self.assertTrue(torch.autograd.gradcheck(f, (x, *params), eps=1e-3, atol=2e-3, rtol=2e-2,
                                                     nondet_tol=0.0, check_undefined_grad=False))

    def test_parameters_share_memory_with_the_layer(self):
        moe = MoE(self.world.communicator, 8, 8, 2, k=1, seed=1)
        x = torch.randn(10, 8)
        y0, _, _ = moe(x)
        with torch.no_grad():
            moe.w2.zero_()
            moe.b2.fill_(0.5)
        y1, _, _ = moe(x)  # the C++ layer reads the updated tensors: every kept token gives 0.5 * weight
        self.assertFalse(torch.allclose(y0, y1))
        top = torch.softmax(x @ moe.gate_weight.detach(), dim=1).max(dim=1).values
        kept = y1.abs().sum(dim=1) > 0
        self.assertTrue(torch.allclose(y1[kept], 0.5 * top[kept, None].expand(-1, 8), atol=1e-6))

    def test_auto_plan_gives_the_fixed_plans_result(self):
        moe = MoE(self.world.communicator, 16, 24, 4, k=2, capacity_factor=0.0, seed=3)
        x = torch.randn(40, 16)
        y_fixed, _, _ = moe(x, exchange="dropless")
        y_auto, _, _ = moe(x, plan="auto")  # the planner calibrates once, then picks r, d, a2a, exchange
        self.assertTrue(torch.allclose(y_fixed, y_auto, atol=1e-6), moe.layer.last_plan)

    def test_several_forwards_before_their_backwards(self):
        # Gradient accumulation: three forwards, then one backward through all of them,
        # equals each batch's forward + backward in turn (no recompute, no stale batch).
        torch.manual_seed(self.seed)
        moe = MoE(self.world.communicator, 16, 24, 4, k=2, capacity_factor=0.75, seed=5)
        xs = [torch.randn(n, 16, requires_grad=True) for n in (30, 7, 19)]
        gs = [torch.randn(x.shape[0], 16) for x in xs]
        outs = [moe(x, d=2 if i == 0 else 1) for i, x in enumerate(xs)]
        sum(((y * g).sum() + 0.01 * b) for (y, b, _), g in zip(outs, gs)).backward()
        together = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone() for x in xs]
        moe.zero_grad()
        for i, (x, g) in enumerate(zip(xs, gs)):
            x.grad = None
            y, b, _ = moe(x, d=2 if i == 0 else 1)
            ((y * g).sum() + 0.01 * b).backward()
        apart = [p.grad for p in moe.parameters()] + [x.grad for x in xs]
        for a, b in zip(together, apart):
            self.assertTrue(torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max()))

    def test_communicator_collectives_on_torch_tensors(self):
        comm = self.world.communicator
        t = torch.randn(7)
        out = torch.full((7 * comm.size,), float("nan"))
        comm.allgather(t, out)
        self.assertTrue(torch.equal(out[comm.rank * 7:(comm.rank + 1) * 7], t))
        a = torch.arange(6 * comm.size, dtype=torch.float32)
        b = torch.full_like(a, float("nan"))
        comm.alltoall(a, b)
        self.assertFalse(bool(torch.isnan(b).any()))
        c = torch.full((3,), float("nan"))
        comm.alltoallv(torch.ones(3), [3], c, [3])  # the one-rank world these tests run in
        self.assertTrue(torch.equal(c, torch.ones(3)))
        s = torch.tensor([2.0, -1.0])
        comm.allreduce(s, op="max")
        comm.broadcast(s, root=0)
        comm.barrier()
        self.assertEqual(s.tolist(), [2.0, -1.0])
        with self.assertRaisesRegex(ValueError, "op"):
            comm.allreduce(s, op="mean")
        with self.assertRaises(ValueError):
            comm.allreduce([1.0, 2.0])

    def test_routing_and_plan_per_call_and_bad_input(self):
        moe = MoE(self.world.communicator, 8, 8, 4, k=2, seed=2)
        x = torch.randn(16, 8)
        y_a, _, _ = moe(x, capacity_factor=0.0, k=1)
        y_b, _, _ = moe(x, capacity_factor=0.0, k=1, exchange="dropless", d=2)
        self.assertTrue(torch.allclose(y_a, y_b, atol=1e-6))
        self.assertIn("o = 2", moe.layer.last_plan)  # o: the overlap (pipelining) degree d
        with self.assertRaises(ValueError):
            moe(x.double())
        with self.assertRaisesRegex(ValueError, "exchange"):
            moe(x, exchange="sideways")

    def test_router_options_balance_top1_and_capacity_rounding(self):
        moe = MoE(self.world.communicator, 8, 8, 4, k=2, seed=3, balance_loss="top1", capacity_rounding="tutel")
        x = torch.randn(32, 8)
        _, balance, _ = moe(x, capacity_factor=0.0)
        # GShard's form from its definition: E * sum_e (share of tokens whose first choice is e) * (mean score of e).
        with torch.no_grad():
            scores = torch.softmax(x.double() @ moe.gate_weight.double(), dim=1)
            first = torch.nn.functional.one_hot(scores.argmax(dim=1), 4).double().mean(dim=0)
            want = 4 * float((first * scores.mean(dim=0)).sum())
        self.assertAlmostEqual(float(balance), want, places=5)
        with self.assertRaisesRegex(Exception, "capacity_rounding"):
            MoE(self.world.communicator, 8, 8, 4, capacity_rounding="gshard")


if __name__ == "__main__":
    unittest.main()
