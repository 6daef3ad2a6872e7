"""Two small real training tasks for the convergence benchmark, with nothing to download.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), a deep pre-norm
  residual MLP; 1497 images train, 300 (fixed) evaluate; metric: accuracy and loss.
- ``charlm``: a character-level causal transformer language model on the standard library's
  own ``.py`` sources (sorted file names, the first ~``chars`` bytes, ASCII); the last 10 %
  is held out; metric: validation loss in nats per character.

Each task gives a model as a *list of layers* (one tensor in, one tensor out, no dropout, so
it splits into any number of contiguous pipeline stages), a deterministic stream of (x, y)
mini-batches per seed, a loss function (mean over the micro-batch) and an evaluation of the
final weights. The same interface serves the reference trainer now and the real pipeline later.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class Task:
    name: str
    build: Callable[[int], list[nn.Module]]            # seed -> layers (initial weights)
    batches: Callable[[int, int], list]                # (seed, steps) -> [(x, y)] mini-batches
    loss_fn: Callable                                  # (out, y) -> mean loss
    evaluate: Callable[[list[nn.Module]], dict]        # trained layers/stages -> metrics
    metric: str                                        # the headline key of evaluate's dict
    lr: dict                                           # optimizer kind -> learning rate


def split(layers: list[nn.Module], p: int) -> list[nn.Module]:
    """p contiguous stages with layer counts as equal as possible (earlier stages get one
    more when p does not divide the count)."""
    if p > len(layers):
        raise ValueError(f"{len(layers)} layers cannot fill {p} stages")
    sizes = [len(layers) // p + (i < len(layers) % p) for i in range(p)]
    stages, at = [], 0
    for size in sizes:
        stages.append(nn.Sequential(*layers[at:at + size]))
        at += size
    return stages


def _shuffled_batches(n: int, batch: int, seed: int, steps: int) -> list[torch.Tensor]:
    """Index sets of ``steps`` mini-batches: epochs of a seed-dependent permutation."""
    g = torch.Generator().manual_seed(1000 + seed)
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        out.append(perm[:batch])
        perm = perm[batch:]
    return out


# ------------------------------------------------------------------ digits


class ResidualBlock(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)): pre-norm residual MLP block."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.ln(x))))


class Head(nn.Module):
    def __init__(self, d: int, out: int):
        super().__init__()
        self.ln, self.proj = nn.LayerNorm(d), nn.Linear(d, out)

    def forward(self, x):
        return self.proj(self.ln(x))


def digits(width: int = 32, blocks: int = 6, batch: int = 64) -> Task:
    """Residual MLP 64 -> width, ``blocks`` residual blocks, head to 10 classes: blocks + 2
    layers (8 by default: one per stage at p = 8). Learning rates: the best of a 3x grid for
    ``sync`` at p = 4 (seed 0), so that the synchronous baseline is not handicapped."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x_all = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    test, train = order[:300], order[300:]
    x_tr, y_tr, x_te, y_te = x_all[train], y_all[train], x_all[test], y_all[test]

    def build(seed):
        torch.manual_seed(seed)
        return ([nn.Linear(64, width)] + [ResidualBlock(width, 2 * width) for _ in range(blocks)]
                + [Head(width, 10)])

    def batches(seed, steps):
        return [(x_tr[i], y_tr[i]) for i in _shuffled_batches(len(x_tr), batch, seed, steps)]

    def evaluate(layers):
        with torch.no_grad():
            out = nn.Sequential(*layers)(x_te)
        return {"accuracy": (out.argmax(1) == y_te).float().mean().item(),
                "loss": nn.functional.cross_entropy(out, y_te).item()}

    return Task("digits", build, batches, nn.functional.cross_entropy, evaluate, "accuracy",
                {"sgd": 0.02, "adam": 5e-3})


# ------------------------------------------------------------------ character LM


def stdlib_text(chars: int) -> bytes:
    """The first ``chars`` bytes of the standard library's top-level .py files (sorted by
    name), non-ASCII bytes replaced by '?': text that ships with every Python."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and total < chars:
            with open(os.path.join(root, name), "rb") as f:
                parts.append(f.read())
            total += len(parts[-1])
    text = b"".join(parts)[:chars]
    return bytes(c if c < 128 else 63 for c in text)


class Embed(nn.Module):
    """Token + learned position embedding: (B, S) int64 -> (B, S, d)."""

    def __init__(self, vocab: int, d: int, seq: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)

    def forward(self, x):
        return self.tok(x) + self.pos[: x.shape[1]]


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention + MLP, (B, S, d) -> (B, S, d)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = ResidualBlock(d, 4 * d)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, d))
        return self.mlp(x)


def charlm(width: int = 32, blocks: int = 6, seq: int = 32, batch: int = 16,
           chars: int = 300_000, eval_windows: int = 64) -> Task:
    """Embedding, ``blocks`` transformer blocks, head: blocks + 2 layers (8 by default: one
    per stage at p = 8). Mini-batches are random windows of the training text; evaluation
    is the mean loss over ``eval_windows`` fixed, evenly spaced windows of the held-out text.
    Learning rates chosen as for ``digits``."""
    text = torch.tensor(list(stdlib_text(chars)), dtype=torch.long)
    cut = int(len(text) * 0.9)
    train, val = text[:cut], text[cut:]
    vocab = 128

    def windows(src, starts):
        idx = starts[:, None] + torch.arange(seq + 1)
        w = src[idx]
        return w[:, :-1], w[:, 1:]

    def build(seed):
        torch.manual_seed(seed)
        return ([Embed(vocab, width, seq)] + [TransformerBlock(width, 4) for _ in range(blocks)]
                + [Head(width, vocab)])

    def batches(seed, steps):
        g = torch.Generator().manual_seed(2000 + seed)
        return [windows(train, torch.randint(0, len(train) - seq - 1, (batch,), generator=g))
                for _ in range(steps)]

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))

    val_x, val_y = windows(val, torch.linspace(0, len(val) - seq - 2, eval_windows).long())

    def evaluate(layers):
        with torch.no_grad():
            loss = loss_fn(nn.Sequential(*layers)(val_x), val_y).item()
        return {"loss": loss, "bits_per_char": loss / math.log(2)}

    return Task("charlm", build, batches, loss_fn, evaluate, "loss", {"sgd": 0.1, "adam": 8e-3})
