"""switchyard.torch: the MoE layer as a torch.nn.Module, and what a PyTorch
training loop needs around it (DDP, gradient sync, checkpoints).

The parameters are ordinary torch tensors that share memory with the C++
layer (DLPack): optimizers update them in place and the C++ forward reads
them. Forward and backward run in C++ through a torch.autograd.Function; the
expert all-to-all runs on Switchyard's communicator. Each forward's batch
handle (its dispatch plan and saved activations) lives in the autograd
context, so any number of forwards may precede their backwards (gradient
accumulation, several micro-batches) without recomputing anything.

Gradient conventions. The C++ backward gives each expert (and the gate) the
sum over the group's ranks of the gradients of their losses: right when each
rank's loss is its part of one global loss. Under DistributedDataParallel
(which averages the dense gradients over its ranks), prepare_ddp() (or this
module's DistributedDataParallel) scales the MoE's gradients by 1/world so
the whole model follows DDP's average; allreduce_gradients() does the same
for training loops without DDP.
"""
import copy
import json
import re
import sys
import weakref

import torch
from torch.utils import dlpack as _dlpack

from . import _switchyard

_EXPERT_TENSORS = ("w1", "b1", "w2", "b2")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _t(capsule):
    return _dlpack.from_dlpack(capsule)


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, routing, plan, *params):
        layer = module.layer
        x32 = x.detach().to(torch.float32).contiguous()
        out, balance, z, dropped, batch = layer.forward(x32, **routing, **plan)
        # The handle goes with the graph (its buffers back to the layer's pool);
        # kept after backward for retain_graph and gradcheck's repeated backwards.
        ctx.module, ctx.batch, ctx.x_dtype = module, batch, x.dtype
        # Saved only so torch's version counters catch an in-place change of the weights
        # between this forward and its backward (the C++ backward reads them as they are then).
        ctx.save_for_backward(*params)
        module.last_dropped = dropped
        y = _t(out)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)), torch.tensor(balance, dtype=torch.float32), \
            torch.tensor(z, dtype=torch.float32)

    @staticmethod
    def backward(ctx, dout, dbalance, dz):
        module = ctx.module
        layer = module.layer
        ctx.saved_tensors  # raises if a weight was modified in place since the forward
        layer.zero_grad()
        # The input gradient's all-to-all is collective: every rank of the group runs it
        # whether or not its own x needs a gradient (a rank with no tokens may pass one that does not).
        want_dx = ctx.needs_input_grad[0]
        # d(loss)/d(balance) and d(loss)/d(z) are the coefficients the caller gave the losses.
        dx = layer.backward(ctx.batch, dout.to(torch.float32).contiguous(), balance_coef=float(dbalance),
                            z_coef=float(dz), input_grad=want_dx or module.group.size > 1)
        grads = layer.grads()
        # No copies: zero_grad() above gave the layer fresh gradient tensors, and the
        # next backward gets fresh ones again, so these stay torch's alone.
        param_grads = [_t(grads[name]) for name in MoE.names]
        if module.gradient_scale != 1.0:
            for g in param_grads:
                g.mul_(module.gradient_scale)
        edp = module.expert_data_parallel_group
        if edp is not None and edp.size > 1:
            # The same experts live on every rank of this group: their gradients (and the
            # replicated gate's) are summed over it.
            for g in param_grads:
                edp.allreduce(g)
        if dx is not None and want_dx:
            dx = _t(dx)
            if ctx.x_dtype != torch.float32:
                dx = dx.to(ctx.x_dtype)
        else:
            dx = None
        return (dx, None, None, None, *param_grads)


def _enclosing_ddp():
    """The torch DistributedDataParallel whose forward is running this call, if any."""
    ddp_type = torch.nn.parallel.DistributedDataParallel
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return None
        if frame.f_code.co_name in ("forward", "_run_ddp_forward"):
            owner = frame.f_locals.get("self")
            if isinstance(owner, ddp_type):
                return owner
        frame = frame.f_back
    return None


class MoE(torch.nn.Module):
    """A mixture-of-experts FFN over `group` (a switchyard Communicator).

    forward(x) takes [..., model_dim] (float32, bfloat16 or float16; computed
    in float32, or bf16 with compute="bf16") and returns (y, balance_loss,
    z_loss), y shaped and typed like x; add coef * balance_loss to the loss to
    train the gate to balance. An empty batch ([0, model_dim]) still joins the
    group's all-to-all. Routing (capacity_factor, k) and the execution plan (r,
    d, a2a, exchange, or plan="auto") may change on every call.

    Parameters: gate_weight [model_dim, experts] (replicated: the same on every
    rank), and this rank's experts w1, b1, w2, b2 (experts_here lists their
    logical ids). state_dict() keys the experts by logical id
    ("experts.<e>.w1", as the C++ checkpoints), so a state_dict loads on
    whichever rank holds those experts.

    expert_data_parallel_group: a Communicator over the ranks holding the same
    experts (expert groups smaller than the world): the expert and gate
    gradients are summed over it after the C++ backward.
    """

    names = ("gate.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2")

    def __init__(self, group, model_dim, hidden_dim, experts, k=2, activation="gelu", gate="softmax",
                 capacity_factor=1.0, renormalize=False, compute="f32", seed=0, ranks_per_node=0,
                 capacity_rounding="switchyard", balance_loss="all_choices", expert_data_parallel_group=None):
        super().__init__()
        self._config = dict(model_dim=model_dim, hidden_dim=hidden_dim, experts=experts, k=k, activation=activation,
                            gate=gate, capacity_factor=capacity_factor, renormalize=renormalize, compute=compute,
                            seed=seed, ranks_per_node=ranks_per_node, capacity_rounding=capacity_rounding,
                            balance_loss=balance_loss)
        self.layer = _switchyard.MoELayer(group, **self._config)
        # The parameters are the C++ layer's own memory, and must stay so (see _apply).
        shared = self._layer_tensors()
        self._layer_ptrs = {name: t.data_ptr() for name, t in shared.items()}
        self._layer_shapes = {name: t.shape for name, t in shared.items()}
        for name, tensor in shared.items():
            setattr(self, name, torch.nn.Parameter(tensor))
        # The gate is replicated on every rank and its gradient already summed over the
        # group; the experts live on this rank only (not data-parallel parameters).
        self.gate_weight.switchyard_reduced = True
        self.experts_here = self.layer.experts_here
        self.expert_data_parallel_group = expert_data_parallel_group
        self.gradient_scale = 1.0
        self.last_dropped = 0
        self.routing = {}
        self.plan = {}
        self._ddp_prepared = False
        self._ddp_checked = None

    @property
    def group(self):
        return self.layer.group

    def set_routing(self, capacity_factor=None, k=None):
        self.routing = {key: v for key, v in (("capacity_factor", capacity_factor), ("k", k)) if v is not None}

    def set_plan(self, plan="fixed", r=1, d=1, a2a="flat", exchange="padded"):
        self.plan = {"plan": plan, "r": r, "d": d, "a2a": a2a, "exchange": exchange}

    def extra_repr(self):
        c = self._config
        plan = self.plan.get("plan", "fixed")
        if plan == "fixed":
            p = {"r": 1, "d": 1, "a2a": "flat", "exchange": "padded", **self.plan}
            plan = f"r={p['r']}, d={p['d']}, a2a={p['a2a']}, exchange={p['exchange']}"
        here = ", ".join(str(e) for e in self.experts_here)
        cf = self.routing.get("capacity_factor", c["capacity_factor"])
        return (f"model_dim={c['model_dim']}, hidden_dim={c['hidden_dim']}, experts={c['experts']} "
                f"([{here}] on rank {self.group.rank} of {self.group.size}"
                + (f", sliced {self.layer.slices} ways" if self.layer.slices > 1 else "") + "), "
                f"k={self.routing.get('k', c['k'])}, capacity_factor={cf}"
                + (" (dropless)" if cf == 0 else "") + f", activation={c['activation']}, gate={c['gate']}, "
                f"compute={c['compute']}, plan: {plan}")

    def _check_input(self, x):
        M = self._config["model_dim"]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"switchyard MoE: x is {type(x).__name__}, expected a torch.Tensor [..., {M}]")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"switchyard MoE: x is {x.dtype}, expected float32, bfloat16 or float16 "
                            f"(the C++ layer computes in float32 or bf16)")
        if x.dim() < 1 or x.shape[-1] != M:
            raise ValueError(f"switchyard MoE: x has shape {list(x.shape)}, expected [..., {M}] (model_dim {M})")
        if x.device.type != "cpu":
            raise NotImplementedError(f"switchyard MoE: x is on {x.device}; this build of switchyard.torch computes "
                                      f"on host (cpu) tensors only")

    def _check_ddp(self):
        """A torch DDP that does not leave the experts alone broadcasts rank 0's experts over
        every other rank's and averages different experts' gradients: refuse it."""
        ddp = _enclosing_ddp()
        if ddp is None or (self._ddp_checked is not None and self._ddp_checked() is ddp):
            return
        mine = {id(p) for p in self.parameters(recurse=False)}
        synced = [n for n in _ddp_names(ddp.module, mine) if n not in ddp.parameters_to_ignore]
        if synced or not self._ddp_prepared:
            raise RuntimeError(
                "switchyard MoE inside torch.nn.parallel.DistributedDataParallel without "
                "switchyard.torch.prepare_ddp(model) before wrapping: DDP would broadcast rank 0's experts over the "
                "other ranks' (different experts) and average their gradients"
                + (f" (it syncs {', '.join(synced)})" if synced else "")
                + ". Wrap with switchyard.torch.DistributedDataParallel(model, ...), or call "
                "switchyard.torch.prepare_ddp(model) first, and rebuild the model's experts (DDP's construction "
                "already overwrote them).")
        self._ddp_checked = weakref.ref(ddp)  # not the module itself: that would make it a submodule (a cycle)

    def forward(self, x, capacity_factor=None, k=None, **plan):
        self._check_input(x)
        self._keep_in_layer_memory()
        if torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._check_ddp()
        routing = dict(self.routing)
        if capacity_factor is not None:
            routing["capacity_factor"] = capacity_factor
        if k is not None:
            routing["k"] = k
        shape = x.shape
        # bf16 compute keeps bf16 copies of w1 and w2 while they are unchanged; torch's version counters
        # say when an optimizer or a load wrote them (writes through .data escape the counters).
        versions = (self.w1.data_ptr(), self.w1._version, self.w2.data_ptr(), self.w2._version)
        if versions != getattr(self, "_weights_versions", None):
            self.layer.parameters_changed()
            self._weights_versions = versions
        params = (self.gate_weight, self.w1, self.b1, self.w2, self.b2)
        y, balance, z = _MoEFunction.apply(x.reshape(-1, shape[-1]), self, routing, {**self.plan, **plan}, *params)
        return y.reshape(shape), balance, z

    # --- the parameters stay the C++ layer's memory -----------------------------------------

    def _apply(self, fn):
        """What .to(), .float(), .half(), .double(), .cuda() call: refuse, before changing anything,
        what the C++ layer cannot compute with; otherwise keep the parameters in its memory."""
        for name, p in self._parameters.items():
            with torch.no_grad():
                probe = fn(p)
            if probe.dtype != torch.float32 or probe.device.type != "cpu":
                raise TypeError(
                    f"switchyard MoE: this conversion would make {name} {probe.dtype} on {probe.device}; the MoE's "
                    f"parameters live in the C++ layer's float32 host memory (compute='bf16' computes in bf16 from "
                    f"them, and bfloat16/float16 inputs are accepted as they are). Leave the MoE out of the "
                    f"conversion (convert the other modules, or use torch.autocast).")
        super()._apply(fn)
        self._keep_in_layer_memory()
        return self

    def _keep_in_layer_memory(self):
        """A parameter given other memory (a conversion that copies, share_memory_, which moves the storage
        itself, `p.data = ...` as vector_to_parameters does): its values go back into the C++ layer's
        memory, which it points at again, so the layer computes with what the parameter holds."""
        layer_memory = None
        for name, p in self._parameters.items():
            if p.data_ptr() == self._layer_ptrs[name]:
                continue
            if p.dtype != torch.float32 or p.device.type != "cpu" or p.shape != self._layer_shapes[name]:
                raise TypeError(f"switchyard MoE: parameter {name} is now {p.dtype} {list(p.shape)} on {p.device}; "
                                f"the C++ layer computes with float32 {list(self._layer_shapes[name])} on the host")
            if layer_memory is None:
                layer_memory = self._layer_tensors()
            with torch.no_grad():
                layer_memory[name].copy_(p.data)
            p.data = layer_memory[name]
            self._weights_versions = None  # new values behind an unchanged version counter: bf16 copies again

    def _layer_tensors(self):
        shared = self.layer.parameters()
        return {"gate_weight": _t(shared["gate.weight"]), "w1": _t(shared["experts.w1"]),
                "b1": _t(shared["experts.b1"]), "w2": _t(shared["experts.w2"]), "b2": _t(shared["experts.b2"])}

    def __deepcopy__(self, memo):
        """A new C++ layer on the same group (communicators are shared, not copied) with the values copied;
        everything else (a subclass's own modules, hooks, settings) deep-copied as torch would."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        shared = ("layer", "_parameters", "_layer_ptrs", "_layer_shapes", "expert_data_parallel_group",
                  "_ddp_checked")
        for key, value in self.__dict__.items():
            if key not in shared:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["expert_data_parallel_group"] = self.expert_data_parallel_group
        new.__dict__["_ddp_checked"] = None
        new.__dict__["layer"] = _switchyard.MoELayer(self.group, **self._config)
        fresh = new._layer_tensors()
        new.__dict__["_layer_ptrs"] = {name: t.data_ptr() for name, t in fresh.items()}
        new.__dict__["_layer_shapes"] = {name: t.shape for name, t in fresh.items()}
        new.__dict__["_parameters"] = {}
        with torch.no_grad():
            for name, p in self._parameters.items():
                fresh[name].copy_(p)
                q = torch.nn.Parameter(fresh[name], requires_grad=p.requires_grad)
                if p.grad is not None:
                    q.grad = p.grad.clone()
                q.__dict__.update(copy.deepcopy(p.__dict__, memo))
                new._parameters[name] = q
                memo[id(p)] = q
        return new

    def __copy__(self):
        """A shallow copy shares everything, the C++ layer included (as copy.copy of a module shares its
        parameters)."""
        cls = type(self)
        new = cls.__new__(cls)
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self):
        raise TypeError("switchyard MoE cannot be pickled (torch.save(model), multiprocessing): its experts live in a "
                        "C++ layer bound to a communicator. Save state_dict() instead, or "
                        "switchyard.torch.save_checkpoint(dir, model, group) for a checkpoint any world size loads.")

    # --- state_dict keyed by logical expert ---------------------------------------------------

    def _expert_key(self, expert, name):
        if self.layer.slices == 1:
            return f"experts.{expert}.{name}"
        return f"experts.{expert}.slice{self.layer.slice}of{self.layer.slices}.{name}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        gate = self.gate_weight
        destination[prefix + "gate.weight"] = gate if keep_vars else gate.detach()
        for name in _EXPERT_TENSORS:
            p = getattr(self, name)
            p = p if keep_vars else p.detach()
            for slot, e in enumerate(self.experts_here):
                destination[prefix + self._expert_key(e, name)] = p[slot]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for hook in self._load_state_dict_pre_hooks.values():  # what torch's own _load_from_state_dict runs first
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        E = self._config["experts"]
        expert_key = re.compile(r"experts\.(\d+)\.(?:slice\d+of\d+\.)?(w1|b1|w2|b2)$")
        present = set()
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            m = expert_key.match(rest)
            if rest == "gate.weight" or rest.split(".", 1)[0] in self._modules:  # a child module's: its own
                continue
            if m and int(m.group(1)) < E:
                present.add(int(m.group(1)))  # an expert of this layer, here or on another rank
            else:
                unexpected_keys.append(key)

        def copy_into(target, key):
            value = state_dict[key]
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in the current model is {tuple(target.shape)}")
                return
            with torch.no_grad():
                target.copy_(value)

        if prefix + "gate.weight" in state_dict:
            copy_into(self.gate_weight, prefix + "gate.weight")
        else:
            missing_keys.append(prefix + "gate.weight")
        absent = []
        for slot, e in enumerate(self.experts_here):
            for name in _EXPERT_TENSORS:
                key = prefix + self._expert_key(e, name)
                if key in state_dict:
                    copy_into(getattr(self, name)[slot], key)
                else:
                    missing_keys.append(key)
                    absent.append(e)
        # Another rank's (or world size's) experts in place of this rank's: refused even when not strict,
        # since loading them would put the wrong experts in place. None of this layer's at all: only missing
        # keys, which strict=False accepts (torch 1.13 passes strict=True here whatever the caller's).
        if absent and present:
            error_msgs.append(
                f"switchyard MoE {prefix or '(root)'}: this rank ({self.group.rank} of {self.group.size}) holds "
                f"experts {list(self.experts_here)}"
                + (f" (slice {self.layer.slice} of {self.layer.slices})" if self.layer.slices > 1 else "")
                + f" but the state_dict has experts {sorted(present) if present else 'none'}"
                f" without {sorted(set(absent))}: it was saved by another rank or world size. Load with "
                f"switchyard.torch.load_checkpoint(dir, model) to move experts between world sizes.")


def _ddp_names(model, ids):
    """The names torch 1.13's DDP gives these parameters, in both of its forms: named_parameters()'s
    (its broadcast) and "<module>.<param>" (its reducer: ".w1" for the root module's own)."""
    names = []
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in ids:
                names += [f"{module_name}.{param_name}"] + ([param_name] if not module_name else [])
    return names


def _moe_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _check_layout(m, prefix, world, what):
    """The MoE's expert group times its expert-data-parallel group must be the data-parallel world, or
    the gradients are summed or averaged over the wrong ranks."""
    edp = m.expert_data_parallel_group
    covered = m.group.size * (edp.size if edp is not None else 1)
    if covered != world:
        raise ValueError(
            f"switchyard MoE {prefix or '(root)'}: its expert group has {m.group.size} rank(s)"
            + (f" and its expert_data_parallel_group {edp.size}" if edp is not None else "")
            + f", {covered} in all, but {what} has {world}: "
            + ("pass expert_data_parallel_group (the ranks holding the same experts)" if covered < world else
               "the groups do not match the data-parallel ranks"))


def _dotted(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def prepare_ddp(model, process_group=None):
    """Before torch's DistributedDataParallel(model): its switchyard MoE parameters (experts, and the
    gate, whose gradient Switchyard already sums) are listed in model._ddp_params_and_buffers_to_ignore
    (torch 1.13's mechanism: DDP neither broadcasts nor all-reduces them), and their gradients are scaled
    by 1/world so the whole model follows DDP's averaging. Returns model."""
    import torch.distributed as dist
    world = dist.get_world_size(process_group)
    moes = _moe_modules(model)
    for prefix, m in moes:
        _check_layout(m, prefix, world, "torch.distributed's world (process_group)")
    ids = {id(p) for _, m in moes for p in m.parameters(recurse=False)}
    if not any(p.requires_grad and id(p) not in ids for p in model.parameters()):
        # torch 1.13's DDP would crash on an empty parameter list (a segfault in its shape check).
        raise ValueError("prepare_ddp: every trainable parameter of this model is a switchyard MoE's, so DDP would "
                         "have nothing to sync; use the model without DDP (Switchyard syncs the MoE itself)")
    names = _ddp_names(model, ids)
    for prefix, m in moes:
        m.gradient_scale = 1.0 / world
        m._ddp_prepared = True
        # DDP leaves the gate alone too (Switchyard sums its gradient), so nothing else would make
        # the replicas start equal: rank 0's, as DDP does for the dense parameters.
        with torch.no_grad():
            dist.broadcast(m.gate_weight.data, 0, group=process_group)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]
    return model


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel for a model holding switchyard MoE layers: prepare_ddp(), then
    torch's wrapper (same arguments). The dense parameters go through DDP; the experts stay each rank's own."""

    def __init__(self, module, *args, **kwargs):
        # torch's signature: (module, device_ids, output_device, dim, broadcast_buffers, process_group, ...)
        prepare_ddp(module, kwargs.get("process_group", args[4] if len(args) > 4 else None))
        super().__init__(module, *args, **kwargs)


def allreduce_gradients(model, group, average=True):
    """Gradient sync for training loops without DDP, over `group` (a switchyard Communicator: the data-
    parallel ranks). average=True: each rank's loss is the mean over its own batch, so the dense gradients
    are averaged over the ranks and the MoE's (summed by Switchyard) divided by the world size, as DDP
    does. average=False: each rank's loss is its part of one global loss: the dense gradients are summed
    and the MoE's are left as they are. One all-reduce of every dense gradient, flattened."""
    moes = _moe_modules(model)
    for prefix, m in moes:
        _check_layout(m, prefix, group.size, "the group given")
    moe_params = {id(p) for _, m in moes for p in m.parameters(recurse=False)}
    # Every dense parameter that trains, a missing gradient as zeros: the flat buffer must be the same on
    # every rank even when a branch went unused on some.
    dense = [p for p in model.parameters() if id(p) not in moe_params and p.requires_grad]
    if dense:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                          for p in dense])
        group.allreduce(flat)
        if average:
            flat /= group.size
        offset = 0
        for p in dense:
            n = p.numel()
            value = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            offset += n
    if average and group.size > 1:
        for _, m in _moe_modules(model):
            for p in m.parameters(recurse=False):
                if p.grad is not None:
                    p.grad /= group.size


def clip_grad_norm_(model, max_norm, group):
    """torch.nn.utils.clip_grad_norm_ (2-norm) for a model holding switchyard MoE layers, after the
    gradient sync: the norm of the whole model's gradient, every expert counted once (this rank's experts'
    squares summed over `group`, the switchyard Communicator over every rank of the model), so every rank
    clips by the same factor. torch's own clip_grad_norm_ would see only this rank's experts: the ranks
    would scale their replicated dense parameters differently and drift apart. Returns the norm."""
    expert_params = set()
    expert_sq = torch.zeros(1, dtype=torch.float64)
    for _, m in _moe_modules(model):
        edp = m.expert_data_parallel_group
        counted = edp is None or edp.rank == 0  # replicas across expert groups: once
        for n in _EXPERT_TENSORS:
            p = getattr(m, n)
            expert_params.add(id(p))
            # Sliced experts: each slice holds the whole b2.
            if counted and p.grad is not None and not (n == "b2" and m.layer.slice > 0):
                expert_sq += p.grad.double().pow(2).sum()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense_sq = sum((p.grad.double().pow(2).sum() for p in model.parameters()
                    if p.grad is not None and id(p) not in expert_params), torch.zeros((), dtype=torch.float64))
    group.allreduce(expert_sq)
    norm = (dense_sq + expert_sq[0]).sqrt()
    coef = float(max_norm) / (float(norm) + 1e-6)
    if not coef >= 1:  # a NaN norm makes NaN gradients, as torch's does
        for g in grads:
            g.mul_(coef)
    return norm.to(torch.float32)


# --- checkpoints in the C++ format, at any world size ---------------------------------------
#
# Names: the model's state_dict keys, experts by logical id ("<moe>.experts.<e>.w1"); optimizer
# state "optim.<state key>.<parameter or expert tensor>", shaped like the parameter (experts split by
# logical id like the weights) or, for the scalar keys listed in the metadata, one element.

def _by_owner(named_parameters, moes):
    """(name, parameter, None) for each dense parameter and (prefix, None, moe) once per MoE, in order:
    optimizer state is kept per dense parameter, and per MoE for its expert tensors together."""
    moe_of = {id(getattr(m, n)): (prefix, m) for prefix, m in moes for n in _EXPERT_TENSORS}
    seen = set()
    for name, p in named_parameters:
        if id(p) not in moe_of:
            yield name, p, None
        elif id(moe_of[id(p)][1]) not in seen:
            seen.add(id(moe_of[id(p)][1]))
            yield moe_of[id(p)][0], None, moe_of[id(p)][1]


def _optimizer_state(optimizer, param):
    for key, value in optimizer.state.get(param, {}).items():
        if value is None:  # SGD without momentum keeps momentum_buffer = None
            continue
        if "." in key:
            raise ValueError(f"save_checkpoint: optimizer state key '{key}' contains a '.'")
        yield key, value if isinstance(value, torch.Tensor) else torch.tensor(value)


def save_checkpoint(dir, model, group, optimizer=None, metadata=None):
    """Collective over `group` (a switchyard Communicator over every rank of the model): the model (and the
    optimizer's state, for optimizers whose per-parameter state is tensors shaped like the parameter or
    scalars: Adam, AdamW, SGD) as a new generation of the sharded checkpoint in `dir`, the format of the
    C++ layer and training job: experts by logical id from the ranks holding them, everything else from
    rank 0. load_checkpoint() reads it at any world size; a bare MoE's checkpoint is what the C++
    MoELayer::load reads. metadata: anything JSON can hold, returned by load_checkpoint. Returns the
    generation written."""
    moes = _moe_modules(model)
    expert_prefixes = tuple(_dotted(p, "experts.") for p, _ in moes)
    mine = []
    if group.rank == 0:
        mine += [(k, v.detach().to(torch.float32).contiguous()) for k, v in model.state_dict().items()
                 if not k.startswith(expert_prefixes)]
    writers = {}

    def writes_experts(m):
        """Experts replicated over expert groups: the first group's are saved. Every rank of an expert group
        must agree (sliced experts are gathered over it), whatever order the groups were split in."""
        if id(m) not in writers:
            edp = m.expert_data_parallel_group
            mine = 1.0 if edp is None or edp.rank == 0 else 0.0
            both = torch.tensor([mine, -mine])
            m.group.allreduce(both, op="max")
            if float(both[0]) != -float(both[1]):
                raise ValueError("save_checkpoint: the ranks of an expert group are not all first (or all not first) "
                                 "in their expert_data_parallel_group; split the groups so that they are")
            writers[id(m)] = mine == 1.0
        return writers[id(m)]

    for prefix, m in moes:  # the same order on every rank of an expert group: sliced experts are gathered
        if writes_experts(m):
            mine += [(k, _t(v)) for k, v in m.layer.logical_experts(prefix=_dotted(prefix, ""))]
    meta = {"content": "torch-model", "saved_by": str(group.size), "user": json.dumps(metadata)}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for g in optimizer.param_groups:
            if any(id(p) not in names for p in g["params"]):
                raise ValueError("save_checkpoint: the optimizer holds parameters that are not the model's")
            groups.append({"params": [names[id(p)] for p in g["params"]],
                           **{k: v for k, v in g.items()
                              if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}})
        scalars = set()
        for name, p, m in _by_owner(model.named_parameters(), moes):
            if m is not None:
                prefix = name
                tensors = {n: getattr(m, n) for n in _EXPERT_TENSORS}
                states = {n: dict(_optimizer_state(optimizer, t)) for n, t in tensors.items()}
                keys = sorted({k for st in states.values() for k in st})
                for key in keys:  # the same keys on every rank (one optimizer, one model)
                    if any(key not in states[n] for n in _EXPERT_TENSORS):
                        raise ValueError(f"save_checkpoint: optimizer state '{key}' exists for some of {prefix}'s "
                                         f"expert tensors only")
                    values = {n: states[n][key] for n in _EXPERT_TENSORS}
                    if all(v.shape == tensors[n].shape for n, v in values.items()):
                        if not writes_experts(m):
                            continue
                        moments = {n: v.detach().to(torch.float32).contiguous() for n, v in values.items()}
                        mine += [(k, _t(v)) for k, v in
                                 m.layer.logical_experts(moments, prefix=f"optim.{key}.{_dotted(prefix, '')}")]
                    elif all(v.numel() == 1 for v in values.values()):
                        scalars.add(key)
                        if group.rank == 0:
                            mine += [(f"optim.{key}.{_dotted(prefix, n)}", v.detach().reshape(1).to(torch.float32))
                                     for n, v in values.items()]
                    else:
                        raise ValueError(f"save_checkpoint: optimizer state '{key}' of {prefix}'s experts is "
                                         f"neither shaped like the parameters nor a scalar")
            else:
                for key, v in _optimizer_state(optimizer, p):
                    if v.shape != p.shape:
                        if v.numel() != 1:
                            raise ValueError(f"save_checkpoint: optimizer state '{key}' of {name} has shape "
                                             f"{list(v.shape)}; expected the parameter's or a scalar")
                        scalars.add(key)
                    if group.rank == 0:
                        mine.append((f"optim.{key}.{name}", v.detach().reshape(v.shape if v.shape == p.shape else (1,))
                                     .to(torch.float32).contiguous()))
        meta["optimizer"] = type(optimizer).__name__
        meta["optimizer.param_groups"] = json.dumps(groups)
        meta["optimizer.scalar_keys"] = json.dumps(sorted(scalars))
    return _switchyard.save_checkpoint(group, str(dir), mine, meta)


def load_checkpoint(dir, model, optimizer=None):
    """Loads a checkpoint written by save_checkpoint (or, for a bare MoE, the C++ MoELayer::save) into
    model, whatever world size saved it: each rank takes the dense tensors and the experts it holds now.
    The optimizer's state and hyperparameters (if saved) go into `optimizer`, built over the model's
    parameters in the same groups. Not collective. Returns the metadata given to save_checkpoint."""
    ck = _switchyard.Checkpoint(str(dir))

    def load(name, like):
        t = _t(ck.load(name))
        if list(t.shape) != list(like.shape):
            raise ValueError(f"checkpoint {dir}: '{name}' has shape {list(t.shape)}, the model's is {list(like.shape)}")
        return t.to(like.dtype)

    def logical(name):
        if name not in ck:
            raise KeyError(f"checkpoint {dir}: no tensor '{name}' (saved from a model with other experts?)")
        return _t(ck.load(name))

    moes = _moe_modules(model)
    expert_prefixes = tuple(_dotted(p, "experts.") for p, _ in moes)
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith(expert_prefixes)}
    # Everything this rank needs, checked before anything is overwritten.
    needed = list(dense) + [f"{_dotted(prefix, '')}experts.{e}.{n}" for prefix, m in moes for e in m.experts_here
                            for n in _EXPERT_TENSORS]
    missing = [n for n in needed if n not in ck]
    if missing:
        raise KeyError(f"checkpoint {dir} lacks {len(missing)} tensor(s) this rank needs, e.g. "
                       f"{', '.join(missing[:4])} (saved from a different model?)")
    with torch.no_grad():
        for k, v in dense.items():
            v.copy_(load(k, v))
        for prefix, m in moes:
            m.layer.assign_logical(lambda e, n, p=_dotted(prefix, ""): logical(f"{p}experts.{e}.{n}"))
    meta = ck.metadata
    if optimizer is not None:
        if "optimizer" not in meta:
            raise KeyError(f"checkpoint {dir} holds no optimizer state")
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"checkpoint {dir} holds {meta['optimizer']} state; the optimizer is "
                             f"{type(optimizer).__name__}")
        params = dict(model.named_parameters())
        names = {id(p): n for n, p in params.items()}
        saved_groups = json.loads(meta["optimizer.param_groups"])
        mine = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
        if [g["params"] for g in saved_groups] != mine:
            raise ValueError(f"checkpoint {dir}: the optimizer's parameter groups differ from the saved ones")
        for g, saved in zip(optimizer.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params":
                    g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        scalars = set(json.loads(meta["optimizer.scalar_keys"]))
        by_target = {}
        for full in ck.names():
            if full.startswith("optim."):
                _, key, target = full.split(".", 2)
                by_target.setdefault(target, set()).add(key)
        for name, p, m in _by_owner(params.items(), moes):
            if m is not None:
                prefix = name
                states = {n: {} for n in _EXPERT_TENSORS}
                for n in _EXPERT_TENSORS:
                    for key in by_target.get(_dotted(prefix, n), ()):
                        states[n][key] = _t(ck.load(f"optim.{key}.{_dotted(prefix, n)}")).reshape(())
                first = _dotted(prefix, f"experts.{m.experts_here[0]}.w1") if m.experts_here else None
                for key in sorted(by_target.get(first, ())):
                    moments = {n: torch.zeros_like(getattr(m, n)) for n in _EXPERT_TENSORS}
                    m.layer.assign_logical(
                        lambda e, t, key=key, p=_dotted(prefix, ""): logical(f"optim.{key}.{p}experts.{e}.{t}"), moments)
                    for n in _EXPERT_TENSORS:
                        states[n][key] = moments[n]
                for n in _EXPERT_TENSORS:
                    if states[n]:
                        optimizer.state[getattr(m, n)] = states[n]
            else:
                state = {}
                for key in by_target.get(name, ()):
                    t = _t(ck.load(f"optim.{key}.{name}"))
                    state[key] = t.reshape(()) if key in scalars else t.reshape(p.shape).to(p.dtype)
                if state:
                    optimizer.state[p] = state
    user = meta.get("user")
    return json.loads(user) if user else None
