"""switchyard.torch: the MoE layer as a torch.nn.Module.

The parameters are ordinary torch tensors that share memory with the C++
layer (DLPack): optimizers update them in place and the C++ forward reads
them. Forward and backward run in C++ through a torch.autograd.Function; the
expert all-to-all runs on Switchyard's communicator. Each forward's batch
handle (its dispatch plan and saved activations) lives in the autograd
context, so any number of forwards may precede their backwards (gradient
accumulation, several micro-batches) without recomputing anything.
"""
import torch
from torch.utils import dlpack as _dlpack

from . import _switchyard


def _t(capsule):
    return _dlpack.from_dlpack(capsule)


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, routing, plan, *params):
        layer = module.layer
        x = x.detach().contiguous()
        out, balance, z, dropped, batch = layer.forward(x, **routing, **plan)
        # The handle goes with the graph (its buffers back to the layer's pool);
        # kept after backward for retain_graph and gradcheck's repeated backwards.
        ctx.module, ctx.batch = module, batch
        module.last_dropped = dropped
        return _t(out), torch.tensor(balance, dtype=torch.float32), torch.tensor(z, dtype=torch.float32)

    @staticmethod
    def backward(ctx, dout, dbalance, dz):
        layer = ctx.module.layer
        layer.zero_grad()
        # d(loss)/d(balance) and d(loss)/d(z) are the coefficients the caller gave the losses.
        dx = layer.backward(ctx.batch, dout.contiguous(), balance_coef=float(dbalance), z_coef=float(dz),
                            input_grad=ctx.needs_input_grad[0])
        grads = layer.grads()
        # No copies: zero_grad() above gave the layer fresh gradient tensors, and the
        # next backward gets fresh ones again, so these stay torch's alone.
        param_grads = [_t(grads[name]) for name in ctx.module.names]
        return (_t(dx) if dx is not None else None, None, None, None, *param_grads)


class MoE(torch.nn.Module):
    """A mixture-of-experts FFN over `group` (a switchyard Communicator).

    forward(x) takes [tokens, model_dim] float32 and returns (y, balance_loss,
    z_loss); add coef * balance_loss to the loss to train the gate to balance.
    Routing (capacity_factor, k) and the execution plan (r, d, a2a, exchange,
    or plan="auto") may change on every call.
    """

    names = ("gate.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2")

    def __init__(self, group, model_dim, hidden_dim, experts, k=2, activation="gelu", gate="softmax",
                 capacity_factor=1.0, renormalize=False, compute="f32", seed=0, ranks_per_node=0,
                 capacity_rounding="switchyard", balance_loss="all_choices"):
        super().__init__()
        self.layer = _switchyard.MoELayer(group, model_dim, hidden_dim, experts, k=k, activation=activation,
                                          gate=gate, capacity_factor=capacity_factor, renormalize=renormalize,
                                          compute=compute, seed=seed, ranks_per_node=ranks_per_node,
                                          capacity_rounding=capacity_rounding, balance_loss=balance_loss)
        shared = self.layer.parameters()
        self.gate_weight = torch.nn.Parameter(_t(shared["gate.weight"]))
        self.w1 = torch.nn.Parameter(_t(shared["experts.w1"]))
        self.b1 = torch.nn.Parameter(_t(shared["experts.b1"]))
        self.w2 = torch.nn.Parameter(_t(shared["experts.w2"]))
        self.b2 = torch.nn.Parameter(_t(shared["experts.b2"]))
        # The gate is replicated on every rank and its gradient already summed over the
        # group; the experts live on this rank only (not data-parallel parameters).
        self.gate_weight.switchyard_reduced = True
        self.experts_here = self.layer.experts_here
        self.last_dropped = 0
        self.routing = {}
        self.plan = {}

    def set_routing(self, capacity_factor=None, k=None):
        self.routing = {key: v for key, v in (("capacity_factor", capacity_factor), ("k", k)) if v is not None}

    def set_plan(self, plan="fixed", r=1, d=1, a2a="flat", exchange="padded"):
        self.plan = {"plan": plan, "r": r, "d": d, "a2a": a2a, "exchange": exchange}

    def forward(self, x, capacity_factor=None, k=None, **plan):
        if x.dtype != torch.float32 or x.dim() != 2:
            raise ValueError(f"switchyard MoE: x is {x.dtype} with {x.dim()} dims, expected float32 [tokens, model_dim]")
        routing = dict(self.routing)
        if capacity_factor is not None:
            routing["capacity_factor"] = capacity_factor
        if k is not None:
            routing["k"] = k
        params = (self.gate_weight, self.w1, self.b1, self.w2, self.b2)
        return _MoEFunction.apply(x, self, routing, {**self.plan, **plan}, *params)
