"""switchyard.torch.MoE against a pure-PyTorch MoE with the same weights.

Run with Debian's interpreter: PYTHONPATH=build/python /usr/bin/python3 -m unittest tests/python/test_moe_torch.py
"""
import copy
import math
import os
import pickle
import random
import tempfile
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
        with self.assertRaisesRegex(TypeError, "float64"):
            moe(x.double())
        with self.assertRaisesRegex(ValueError, r"\[16, 7\], expected \[\.\.\., 8\]"):
            moe(x[:, :7])
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

    # --- a module that behaves like torch (issue: PyTorch users) ---------------------------

    def test_any_leading_shape_and_empty_batches(self):
        moe = MoE(self.world.communicator, 8, 12, 4, k=2, capacity_factor=0.0, seed=self.seed)
        x = torch.randn(3, 5, 8, requires_grad=True)
        g = torch.randn(3, 5, 8)
        y, balance, _ = moe(x)
        self.assertEqual(y.shape, x.shape)
        ((y * g).sum() + 0.01 * balance).backward()
        flat = x.detach().reshape(15, 8).clone().requires_grad_()
        moe.zero_grad()
        y2, balance2, _ = moe(flat)
        ((y2 * g.reshape(15, 8)).sum() + 0.01 * balance2).backward()
        self.assertTrue(torch.equal(y.reshape(15, 8), y2))
        self.assertTrue(torch.allclose(x.grad.reshape(15, 8), flat.grad, atol=1e-6))
        for shape in ((0, 8), (2, 0, 8)):  # a rank with no tokens must still run (and join the all-to-all)
            empty = torch.randn(*shape, requires_grad=True)
            moe.zero_grad()
            y, balance, z = moe(empty)
            self.assertEqual(y.shape, empty.shape)
            (y.sum() + balance + z).backward()
            self.assertEqual(empty.grad.shape, empty.shape)
            self.assertEqual(float(moe.w1.grad.abs().sum()), 0.0)
            self.assertTrue(torch.isfinite(balance) and torch.isfinite(z))

    def test_bf16_and_float16_inputs_are_within_tolerance_of_float32(self):
        M = 16
        for compute in ("f32", "bf16"):
            moe = MoE(self.world.communicator, M, 24, 4, k=2, capacity_factor=0.0, compute=compute, seed=self.seed)
            x = torch.randn(33, M)
            for dtype in (torch.bfloat16, torch.float16):
                xl = x.to(dtype).requires_grad_()
                # Against the same rounded input in float32: rounding x itself may flip a near-tie in
                # routing, which is not what this checks (y and dx coming back in x's dtype).
                y32, _, _ = moe(xl.detach().float())
                y, balance, _ = moe(xl)
                self.assertEqual(y.dtype, dtype)
                err = float((y.float() - y32).norm() / y32.norm())
                self.assertLess(err, 2e-2, f"{compute} {dtype}: relative error {err:.2e} (seed {self.seed})")
                (y.float().sum() + balance).backward()
                self.assertEqual(xl.grad.dtype, dtype)

    def test_bf16_weight_copies_follow_optimizer_steps_and_loads(self):
        # bf16 compute keeps bf16 copies of w1 and w2 between forwards; an optimizer step or a state_dict
        # load (torch's version counters) makes them again, so the output always matches a fresh module
        # holding the same weights.
        M = 16
        moe = MoE(self.world.communicator, M, 24, 4, k=2, capacity_factor=0.0, compute="bf16", seed=self.seed)
        x = torch.randn(9, M)
        with torch.no_grad():
            first, _, _ = moe(x)
            again, _, _ = moe(x)
        self.assertTrue(torch.equal(first, again))
        opt = torch.optim.SGD(moe.parameters(), lr=0.5)
        y, balance, _ = moe(x)
        (y.square().sum() + balance).backward()
        opt.step()
        fresh = MoE(self.world.communicator, M, 24, 4, k=2, capacity_factor=0.0, compute="bf16", seed=self.seed + 1)
        fresh.load_state_dict(moe.state_dict())
        with torch.no_grad():
            stepped, _, _ = moe(x)
            want, _, _ = fresh(x)
        self.assertTrue(torch.equal(stepped, want))
        self.assertFalse(torch.equal(stepped, first))
        with torch.no_grad():  # a write without any backward: the counters still see it
            moe.w2.mul_(2.0)
            fresh.w2.mul_(2.0)
            self.assertTrue(torch.equal(moe(x)[0], fresh(x)[0]))
            # p.data = ... (vector_to_parameters): new memory, copied back into the layer's
            vec = torch.nn.utils.parameters_to_vector(moe.parameters()) * 0.5
            torch.nn.utils.vector_to_parameters(vec, moe.parameters())
            torch.nn.utils.vector_to_parameters(vec.clone(), fresh.parameters())
            self.assertTrue(torch.equal(moe(x)[0], fresh(x)[0]))

    def test_autocast_bf16_around_a_block_holding_the_moe(self):
        torch.manual_seed(self.seed)
        M = 16
        inp, out = torch.nn.Linear(M, M), torch.nn.Linear(M, M)
        # k = E: every token reaches every expert, so bf16 rounding cannot flip a routing choice (a flip
        # moves a whole token between experts, far beyond rounding); what is checked is the dtype path.
        moe = MoE(self.world.communicator, M, 24, 4, k=4, capacity_factor=0.0, seed=self.seed)
        x = torch.randn(20, M)

        def run():
            for m in (inp, out, moe):
                m.zero_grad()
            y, balance, _ = moe(torch.relu(inp(x)))
            loss = out(y).float().pow(2).mean() + 0.01 * balance
            loss.backward()
            return float(loss), [p.grad.clone() for p in (*inp.parameters(), *moe.parameters())]

        loss32, grads32 = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16, grads16 = run()
        self.assertLess(abs(loss16 - loss32), 3e-2 * abs(loss32) + 1e-3)
        # All gradients together (one small tensor, e.g. the gate's, has far larger relative rounding
        # from cancellation), and every one of them finite and present.
        for a in grads16:
            self.assertTrue(bool(torch.isfinite(a).all()))
        diff = torch.cat([(a.float() - b).reshape(-1) for a, b in zip(grads16, grads32)])
        ref = torch.cat([b.reshape(-1) for b in grads32])
        self.assertLess(float(diff.norm()), 0.05 * float(ref.norm()), f"seed {self.seed}")

    def test_conversions_keep_the_parameters_in_the_layers_memory(self):
        moe = MoE(self.world.communicator, 8, 8, 2, k=1, seed=1)
        x = torch.randn(10, 8)
        # .float() / .to() keep the storage the C++ layer reads (before: after .double().float()
        # zeroing w2/b2 still gave |y| = 83.6).
        moe.float().to("cpu").to(torch.float32)
        with torch.no_grad():
            moe.w2.zero_()
            moe.b2.zero_()
        self.assertEqual(float(moe(x)[0].abs().max()), 0.0)
        with torch.no_grad():
            moe.b2.fill_(1.0)
        before = [p.detach().clone() for p in moe.parameters()]
        for convert in (lambda m: m.double(), lambda m: m.half(), lambda m: m.bfloat16(),
                        lambda m: m.to(torch.float64), lambda m: torch.nn.Sequential(torch.nn.Linear(8, 8), m).double()):
            with self.assertRaisesRegex(TypeError, "C\\+\\+ layer's float32 host memory"):
                convert(moe)
            for p, b in zip(moe.parameters(), before):
                self.assertEqual(p.dtype, torch.float32)
                self.assertTrue(torch.equal(p, b))
        # A conversion that gives new float32 storage (share_memory_) leaves the values in the layer's memory.
        moe.share_memory()
        with torch.no_grad():
            moe.b2.fill_(0.25)
        y, _, _ = moe(x)
        kept = y.abs().sum(dim=1) > 0
        top = torch.softmax(x @ moe.gate_weight.detach(), dim=1).max(dim=1).values
        self.assertTrue(torch.allclose(y[kept], 0.25 * top[kept, None].expand(-1, 8), atol=1e-6))

    def test_load_state_dict_copies_into_the_shared_storage(self):
        a = MoE(self.world.communicator, 8, 8, 4, k=2, seed=1)
        b = MoE(self.world.communicator, 8, 8, 4, k=2, seed=2)
        x = torch.randn(12, 8)
        b.load_state_dict(a.state_dict())
        self.assertTrue(torch.equal(a(x)[0], b(x)[0]))

    def test_state_dict_keys_are_logical_experts_and_a_wrong_expert_set_is_refused(self):
        E = 4
        moe = MoE(self.world.communicator, 8, 6, E, k=2, seed=3)
        sd = moe.state_dict()
        want = {"gate.weight"} | {f"experts.{e}.{n}" for e in range(E) for n in ("w1", "b1", "w2", "b2")}
        self.assertEqual(set(sd), want)
        self.assertTrue(torch.equal(sd["experts.2.w1"], moe.w1[2]))
        # Another rank's file (experts 2 and 3 only): refused, naming both sets.
        other = {k: v for k, v in sd.items() if not k.startswith(("experts.0.", "experts.1."))}
        with self.assertRaisesRegex(RuntimeError, r"holds experts \[0, 1, 2, 3\].*has experts \[2, 3\] without \[0, 1\]"):
            moe.load_state_dict(other)
        # A key of no expert of this layer is unexpected.
        with self.assertRaisesRegex(RuntimeError, "experts.9.w1"):
            moe.load_state_dict({**sd, "experts.9.w1": sd["experts.0.w1"]})
        inside = torch.nn.Sequential(torch.nn.Linear(8, 8), moe)
        self.assertIn("1.experts.3.b2", inside.state_dict())

    def test_deepcopy_is_an_independent_layer_and_pickling_is_refused(self):
        moe = MoE(self.world.communicator, 8, 8, 4, k=2, seed=4)
        moe.set_routing(capacity_factor=0.0)
        x = torch.randn(9, 8)
        twin = copy.deepcopy(moe)
        self.assertIsNot(twin.layer, moe.layer)
        self.assertTrue(torch.equal(moe(x)[0], twin(x)[0]))
        with torch.no_grad():
            twin.w2.zero_()
            twin.b2.zero_()
        self.assertEqual(float(twin(x)[0].abs().max()), 0.0)
        self.assertGreater(float(moe(x)[0].abs().max()), 0.0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), moe)
        self.assertTrue(torch.equal(copy.deepcopy(model)(x)[0], model(x)[0]))
        with self.assertRaisesRegex(TypeError, "cannot be pickled.*save_checkpoint"):
            pickle.dumps(model)

    def test_repr_names_experts_k_capacity_plan_and_ranks(self):
        moe = MoE(self.world.communicator, 8, 6, 4, k=2, capacity_factor=1.25, seed=0)
        moe.set_plan(d=2, exchange="dropless")
        text = repr(moe)
        for part in ("model_dim=8", "hidden_dim=6", "experts=4", "[0, 1, 2, 3] on rank 0 of 1", "k=2",
                     "capacity_factor=1.25", "d=2", "exchange=dropless"):
            self.assertIn(part, text)

    def test_activation_checkpointing_around_a_block_holding_the_moe(self):
        from torch.utils.checkpoint import checkpoint
        torch.manual_seed(self.seed)
        M = 16
        lin = torch.nn.Linear(M, M)
        moe = MoE(self.world.communicator, M, 24, 4, k=2, capacity_factor=1.0, seed=self.seed)
        x = torch.randn(25, M, requires_grad=True)

        def block(h):
            y, balance, _ = moe(torch.tanh(lin(h)))
            return y, balance

        def grads(wrap):
            for p in (*lin.parameters(), *moe.parameters(), x):
                p.grad = None
            y, balance = wrap(x)
            (y.pow(2).sum() + 0.1 * balance).backward()
            return [p.grad.clone() for p in (*lin.parameters(), *moe.parameters(), x)]

        plain = grads(block)
        for reentrant in (True, False):
            checked = grads(lambda h: checkpoint(block, h, use_reentrant=reentrant))
            for a, b in zip(checked, plain):
                self.assertTrue(torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"use_reentrant={reentrant}")

    def test_two_forwards_then_two_backwards_accumulate(self):
        moe = MoE(self.world.communicator, 8, 8, 4, k=2, capacity_factor=0.0, seed=6)
        xa, xb = torch.randn(11, 8), torch.randn(6, 8)
        ya, ba, _ = moe(xa)
        yb, bb, _ = moe(xb)
        (ya.sum() + 0.1 * ba).backward()
        (yb.pow(2).sum() + 0.1 * bb).backward()
        accumulated = [p.grad.clone() for p in moe.parameters()]
        parts = []
        for x, f in ((xa, lambda y: y.sum()), (xb, lambda y: y.pow(2).sum())):
            moe.zero_grad()
            y, b, _ = moe(x)
            (f(y) + 0.1 * b).backward()
            parts.append([p.grad.clone() for p in moe.parameters()])
        for acc, a, b in zip(accumulated, *parts):
            self.assertTrue(torch.allclose(acc, a + b, rtol=1e-5, atol=1e-6))

    def test_init_leaves_torchs_threads_alone_unless_asked(self):
        torch.set_num_threads(1)
        switchyard.init()
        self.assertEqual(torch.get_num_threads(), 1)
        moe = MoE(self.world.communicator, 8, 8, 2, k=1, seed=0)
        switchyard.set_gemm_threads(2)  # Switchyard's calls use 2; torch's setting is untouched
        try:
            self.assertEqual(switchyard.gemm_threads(), 2)
            y, _, _ = moe(torch.randn(4, 8))
            y.sum().backward()
            self.assertEqual(torch.get_num_threads(), 1)
        finally:
            switchyard.set_gemm_threads(None)
        self.assertEqual(switchyard.gemm_threads(), 1)
        with self.assertRaisesRegex(ValueError, "gemm_threads"):
            switchyard.set_gemm_threads(0)

    def test_checkpoint_save_resume_with_adam_continues_the_run(self):
        from switchyard.torch import load_checkpoint, save_checkpoint
        torch.manual_seed(self.seed)
        M = 12
        comm = self.world.communicator

        def make(seed):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(M, M), MoE(comm, M, 16, 4, k=2, capacity_factor=0.0, seed=seed))
            return model, torch.optim.Adam(model.parameters(), lr=1e-2)

        x, target = torch.randn(30, M), torch.randn(30, M)

        def step(model, opt):
            opt.zero_grad()
            y, balance, _ = model[1](model[0](x))
            loss = (y - target).pow(2).mean() + 0.01 * balance
            loss.backward()
            opt.step()
            return float(loss)

        model, opt = make(self.seed)
        straight = [step(model, opt) for _ in range(4)]
        model, opt = make(self.seed)
        first = [step(model, opt) for _ in range(2)]
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, model, comm, opt, metadata={"step": 2})
            other, other_opt = make(self.seed + 1)  # other weights, fresh optimizer
            self.assertEqual(load_checkpoint(d, other, other_opt), {"step": 2})
            ck = switchyard.Checkpoint(d)
            self.assertIn("1.experts.3.w1", ck)
            self.assertIn("optim.exp_avg_sq.1.experts.0.b2", ck)
            # The bare layer's checkpoint is the C++ MoELayer's format: the C++ load reads it.
            save_checkpoint(d + "/layer", model[1], comm)
            fresh = MoE(comm, M, 16, 4, k=2, capacity_factor=0.0, seed=99)
            fresh.layer.load(d + "/layer")
            self.assertTrue(torch.equal(fresh.w1, model[1].w1))
        resumed = first + [step(other, other_opt) for _ in range(2)]
        self.assertEqual(straight, resumed)

    def test_checkpoint_with_sgd_with_and_without_momentum(self):
        from switchyard.torch import load_checkpoint, save_checkpoint
        comm = self.world.communicator
        x, target = torch.randn(16, 8), torch.randn(16, 8)
        for momentum in (0.0, 0.9):
            def make():
                torch.manual_seed(self.seed)
                model = torch.nn.Sequential(torch.nn.Linear(8, 8), MoE(comm, 8, 8, 2, k=1, capacity_factor=0.0, seed=1))
                return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)

            def step(model, opt):
                opt.zero_grad()
                loss = (model[1](model[0](x))[0] - target).pow(2).mean()
                loss.backward()
                opt.step()
                return float(loss)

            model, opt = make()
            straight = [step(model, opt) for _ in range(3)]
            model, opt = make()
            step(model, opt)
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, comm, opt)
                model, opt = make()
                load_checkpoint(d, model, opt)
            self.assertEqual(straight[1:], [step(model, opt) for _ in range(2)], f"momentum {momentum}")

    def _one_rank_torch_distributed(self):
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        return dist

    def test_ddp_leaves_a_root_moe_and_a_subclass_alone_and_refuses_unprepared(self):
        from switchyard.torch import DistributedDataParallel, prepare_ddp
        self._one_rank_torch_distributed()
        comm = self.world.communicator

        class WithShared(MoE):  # a subclass holding a dense child: DDP must sync that and nothing else
            def __init__(self):
                super().__init__(comm, 8, 8, 2, k=1, capacity_factor=0.0, seed=3)
                self.shared = torch.nn.Linear(8, 8)

        model = WithShared()
        ddp = DistributedDataParallel(model)
        reduced, _ = ddp._build_params_for_reducer()  # torch 1.13: what the reducer all-reduces
        self.assertEqual({id(p) for p in reduced}, {id(p) for p in model.shared.parameters()})
        y, _, _ = ddp(torch.randn(5, 8))
        y.sum().backward()
        # A bare MoE: everything is left to Switchyard (torch 1.13's DDP would segfault on the empty list).
        with self.assertRaisesRegex(ValueError, "nothing to sync"):
            prepare_ddp(MoE(comm, 8, 8, 2, k=1, seed=1))
        plain = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 8),
                                                                              MoE(comm, 8, 8, 2, k=1, seed=1)))
        with self.assertRaisesRegex(RuntimeError, r"without switchyard.torch.prepare_ddp.*1\.w1"):
            plain(torch.randn(4, 8))

    def test_load_state_dict_not_strict_subclass_children_and_pre_hooks(self):
        comm = self.world.communicator
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), MoE(comm, 8, 8, 2, k=1, seed=1))
        dense_only = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
        result = model.load_state_dict(dense_only, strict=False)  # a pretrained backbone without the MoE
        self.assertIn("1.gate.weight", result.missing_keys)
        self.assertIn("1.experts.0.w1", result.missing_keys)

        class WithShared(MoE):
            def __init__(self, seed):
                super().__init__(comm, 8, 8, 2, k=1, seed=seed)
                self.shared = torch.nn.Linear(8, 8)

        a, b = WithShared(1), WithShared(2)
        b.load_state_dict(a.state_dict())  # strict: the child's keys are the child's
        self.assertTrue(torch.equal(a.shared.weight, b.shared.weight) and torch.equal(a.w1, b.w1))
        seen = []
        b._register_load_state_dict_pre_hook(lambda sd, prefix, *rest: seen.append(prefix))
        b.load_state_dict(a.state_dict())
        self.assertEqual(seen, [""])

    def test_inplace_change_between_forward_and_backward_is_an_error(self):
        moe = MoE(self.world.communicator, 8, 8, 2, k=1, seed=1)
        y, _, _ = moe(torch.randn(6, 8, requires_grad=True))
        with torch.no_grad():
            moe.w2.mul_(2)
        with self.assertRaisesRegex(RuntimeError, "modified by an inplace operation"):
            y.sum().backward()

    def test_rebound_parameter_data_reaches_the_layer(self):
        moe = MoE(self.world.communicator, 8, 8, 2, k=1, seed=1)
        vector = torch.nn.utils.parameters_to_vector(moe.parameters())
        torch.nn.utils.vector_to_parameters(torch.zeros_like(vector), moe.parameters())  # p.data = ... for each
        self.assertEqual(float(moe(torch.randn(5, 8))[0].abs().max()), 0.0)
        with torch.no_grad():
            moe.b2.fill_(1.0)  # in place again: still the layer's memory
        self.assertGreater(float(moe(torch.randn(5, 8))[0].abs().max()), 0.0)

    def test_deepcopy_of_a_subclass_and_shallow_copy(self):
        comm = self.world.communicator

        class WithShared(MoE):
            def __init__(self):
                super().__init__(comm, 8, 8, 2, k=1, capacity_factor=0.0, seed=3)
                self.shared = torch.nn.Linear(8, 8)

        a = WithShared()
        b = copy.deepcopy(a)
        self.assertIs(type(b), WithShared)
        self.assertIsNot(b.shared, a.shared)
        self.assertTrue(torch.equal(b.shared.weight, a.shared.weight))
        x = torch.randn(7, 8)
        self.assertTrue(torch.equal(a(x)[0], b(x)[0]))
        c = copy.copy(a)
        self.assertIs(c.layer, a.layer)
        self.assertIs(c.w1, a.w1)

    def test_allreduce_gradients_with_an_unused_branch(self):
        from switchyard.torch import allreduce_gradients
        comm = self.world.communicator
        used, unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        model = torch.nn.ModuleDict({"used": used, "unused": unused, "moe": MoE(comm, 8, 8, 2, k=1, seed=1)})
        y, _, _ = model["moe"](used(torch.randn(4, 8)))
        y.sum().backward()
        before = used.weight.grad.clone()
        allreduce_gradients(model, comm, average=True)
        self.assertTrue(torch.equal(used.weight.grad, before))  # one rank: unchanged
        self.assertEqual(float(unused.weight.grad.abs().sum()), 0.0)  # zeros, as every rank must send something


if __name__ == "__main__":
    unittest.main()
