"""The tiny MoE language models (README.md gives the architecture exactly):
byte-level decoder-only transformers whose FFNs are Switchyard MoE layers.
Also the corpus, a minimal safetensors writer/reader and the training loop's
helpers. Run through train.py (training) and trace.py (routing traces).
"""
import json
import math
import os
import struct

import sys

import torch
import torch.nn.functional as F

try:
    import switchyard
except ImportError:  # run from a checkout: the module `make build` put in build/python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "python"))
    import switchyard
from switchyard.torch import MoE

CORPUS_DIR = "/usr/share/games/fortunes"
# Plain-text fortune files of the Debian package "fortunes" (BSD licence), without the ASCII-art ones.
EXCLUDED = {"art", "ascii-art"}
PROMPT = b"The meaning of life is"


# ---- data ----

def corpus():
    """(train bytes, held-out bytes): every 10th fortune is held out."""
    names = sorted(n for n in os.listdir(CORPUS_DIR) if "." not in n and n not in EXCLUDED)
    if not names:
        raise SystemExit(f"no fortune files in {CORPUS_DIR}: apt-get install fortunes (scripts/install-deps.sh)")
    train, held = bytearray(), bytearray()
    index = 0
    for name in names:
        with open(os.path.join(CORPUS_DIR, name), "rb") as f:
            for fortune in f.read().split(b"\n%\n"):
                fortune = fortune.strip(b"\n") + b"\n\n"
                (held if index % 10 == 9 else train).extend(fortune)
                index += 1
    return bytes(train), bytes(held)


def unigram_cross_entropy(train, held):
    """Nats per byte of held-out text under the train bytes' unigram distribution (add-one smoothing)."""
    counts = torch.bincount(torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), minlength=256).double() + 1
    logp = torch.log(counts / counts.sum())
    h = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
    return float(-logp[h].mean())


def batch_of(data, batch, seq, generator):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = torch.stack([buf[s:s + seq].long() for s in starts.tolist()])
    y = torch.stack([buf[s + 1:s + seq + 1].long() for s in starts.tolist()])
    return x, y


# ---- model ----

class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, positions, theta):
    """Rotary positions, half-split: the first and second halves of each head are the pairs."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * freq[None, :]  # [T, half]
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, d, heads, theta):
        super().__init__()
        self.heads, self.theta = heads, theta
        # Stored [in, out]: y = x @ W (the checkpoint's layout).
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Parameter(torch.randn(d, d) / math.sqrt(d)) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        h, hd = self.heads, d // self.heads
        pos = torch.arange(T)
        q = rotary((x @ self.wq).view(B, T, h, hd).transpose(1, 2), pos, self.theta)
        k = rotary((x @ self.wk).view(B, T, h, hd).transpose(1, 2), pos, self.theta)
        v = (x @ self.wv).view(B, T, h, hd).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        return (att @ v).transpose(1, 2).reshape(B, T, d) @ self.wo


class Block(torch.nn.Module):
    def __init__(self, cfg, group, layer_index, seed):
        super().__init__()
        d, ffn = cfg["d_model"], cfg["ffn"]
        self.attn_norm = RMSNorm(d, cfg["norm_eps"])
        self.attn = Attention(d, cfg["heads"], cfg["rope_theta"])
        self.ffn_norm = RMSNorm(d, cfg["norm_eps"])
        self.ffn = MoE(group, d, ffn["hidden"], ffn["experts"], k=ffn["k"], activation=ffn["activation"],
                       gate=ffn["gate"], renormalize=ffn["renormalize"], capacity_factor=0.0,
                       seed=seed * 1000 + layer_index)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        B, T, d = x.shape
        y, balance, _ = self.ffn(self.ffn_norm(x).reshape(B * T, d), exchange="dropless")
        return x + y.view(B, T, d), balance


class TinyLM(torch.nn.Module):
    """Embedding -> blocks (attention, MoE FFN; pre-norm, residual) -> RMSNorm -> LM head."""

    def __init__(self, cfg, group, seed):
        super().__init__()
        torch.manual_seed(seed)  # replicated parameters start equal on every rank
        d, V = cfg["d_model"], cfg["vocab_size"]
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.randn(V, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(cfg, group, i, seed) for i in range(cfg["layers"]))
        self.norm = RMSNorm(d, cfg["norm_eps"])
        self.lm_head = torch.nn.Parameter(torch.randn(d, V) / math.sqrt(d))

    def forward(self, tokens):
        x = self.embed[tokens]
        balance = 0.0
        for block in self.blocks:
            x, b = block(x)
            balance = balance + b
        return self.norm(x) @ self.lm_head, balance / len(self.blocks)

    def moe_layers(self):
        return [b.ffn for b in self.blocks]

    def replicated_parameters(self):
        """Parameters every rank holds and trains alike (their gradients are summed over the ranks)."""
        moe = {id(p) for m in self.moe_layers() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in moe]


# ---- checkpoints: safetensors without extra packages ----

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def save_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        dtype = _TORCH[e["dtype"]]
        raw = bytearray(data[a:b])
        t = torch.frombuffer(raw, dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
        out[name] = (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).reshape(e["shape"]).clone()
    return out


def gather_experts(moe, comm):
    """The whole layer's experts on every rank, in logical order (identity placement: rank r holds r*L..r*L+L-1)."""
    out = {}
    for name, p in (("w1", moe.w1), ("b1", moe.b1), ("w2", moe.w2), ("b2", moe.b2)):
        full = torch.empty((comm.size * p.shape[0],) + tuple(p.shape[1:]))
        comm.allgather(p.detach().contiguous(), full)
        out[name] = full
    return out


def state_tensors(model, comm):
    """The checkpoint's tensors (README.md names them), experts gathered from every rank."""
    t = {"embed.weight": model.embed, "norm.weight": model.norm.weight, "lm_head.weight": model.lm_head}
    for i, b in enumerate(model.blocks):
        p = f"layers.{i}."
        t[p + "attn_norm.weight"] = b.attn_norm.weight
        for w in ("wq", "wk", "wv", "wo"):
            t[p + "attn." + w] = getattr(b.attn, w)
        t[p + "ffn_norm.weight"] = b.ffn_norm.weight
        t[p + "ffn.gate.weight"] = b.ffn.gate_weight
        for name, full in gather_experts(b.ffn, comm).items():
            t[p + "ffn.experts." + name] = full
    return t


def load_into(model, tensors, comm):
    """Loads a checkpoint (any number of ranks saved it) into this rank's model."""
    with torch.no_grad():
        model.embed.copy_(tensors["embed.weight"].float())
        model.norm.weight.copy_(tensors["norm.weight"].float())
        model.lm_head.copy_(tensors["lm_head.weight"].float())
        for i, b in enumerate(model.blocks):
            p = f"layers.{i}."
            b.attn_norm.weight.copy_(tensors[p + "attn_norm.weight"].float())
            for w in ("wq", "wk", "wv", "wo"):
                getattr(b.attn, w).copy_(tensors[p + "attn." + w].float())
            b.ffn_norm.weight.copy_(tensors[p + "ffn_norm.weight"].float())
            b.ffn.gate_weight.copy_(tensors[p + "ffn.gate.weight"].float())
            here = b.ffn.experts_here
            for name in ("w1", "b1", "w2", "b2"):
                getattr(b.ffn, name).copy_(tensors[p + "ffn.experts." + name].float()[here])
