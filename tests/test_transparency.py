"""Transparency: every synchronous schedule gives the unsplit model's loss and gradients.

The matrix: schedule (gpipe, 1f1b, interleaved-1f1b with v = 2, zb-h1, zb-h2) x p in
{1, 2, 3, 4} x m in {1, 2, 3, 8} x re-materialization (never, always, except_last) x three
models — an MLP, a pre-norm transformer whose stages pass (hidden, mask, positions), and a
model with layers of very unequal sizes — in float64, where the only difference from the
reference is summation order: the relative error of every gradient must be below 1e-10.
A float32 subset checks 1e-5. The batch of 8 splits unevenly for m = 3 (3, 3, 2).

Skipped combinations, which the schedule forbids (the skip message carries its reason):
interleaved-1f1b with m not a multiple of p: p = 2 with m = 1, 3; p = 3 with m = 1, 2, 8;
p = 4 with m = 1, 2, 3.
"""

import math

import pytest
import torch
from torch import nn

from pipetrain import schedules
from pipetrain.pipeline import Pipeline

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2"]
BATCH = 8


# -- models -------------------------------------------------------------------------------
def mlp():
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(8)])


class Embed(nn.Module):
    """tokens [B, T] int64, mask [B, T] bool -> (hidden [B, T, D], mask, positions [T])."""

    def __init__(self, vocab, d, t):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)

    def forward(self, inp):
        tokens, mask = inp
        positions = torch.arange(tokens.shape[1])
        return self.tok(tokens) + self.pos[positions], mask, positions


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(LN(h)) masked by key padding; h + MLP(LN(h))."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads = heads

    def forward(self, inp):
        h, mask, positions = inp
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.ff(self.ln2(h)), mask, positions


class Head(nn.Module):
    def __init__(self, d, vocab):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, inp):
        h, mask, positions = inp
        return self.out(self.ln(h))


def transformer():
    vocab, d, t = 11, 8, 5
    return nn.Sequential(Embed(vocab, d, t), *[Block(d, 2) for _ in range(6)], Head(d, vocab))


def unequal():
    widths = [4, 24, 3, 16, 2, 20, 5, 3, 6]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers.append(nn.Sequential(nn.Linear(a, b), nn.Sigmoid()))
    return nn.Sequential(*layers)


def mse(out, target):
    return ((out - target) ** 2).mean()


def cross_entropy(out, target):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def make(name, dtype):
    """(model, inputs, targets, loss_fn) for a model name, seeded, in ``dtype``."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(11)
    if name == "mlp":
        model = mlp()
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g)
        loss = mse
    elif name == "unequal":
        model = unequal()
        x, y = torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 6, generator=g)
        loss = mse
    else:
        model = transformer()
        tokens = torch.randint(0, 11, (BATCH, 5), generator=g)
        mask = torch.rand(BATCH, 5, generator=g) > 0.3
        mask[:, 0] = True  # every row attends somewhere
        x, y = (tokens, mask), torch.randint(0, 11, (BATCH, 5), generator=g)
        loss = cross_entropy
    model = model.to(dtype)
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x) if isinstance(x, tuple) else x.to(dtype)
    y = y.to(dtype) if y.is_floating_point() else y
    return model, x, y, loss


_REFERENCES = {}


def reference(name, dtype):
    """The unsplit model's loss and gradients (computed once per model and dtype)."""
    key = (name, dtype)
    if key not in _REFERENCES:
        model, x, y, loss_fn = make(name, dtype)
        loss = loss_fn(model(x), y)
        loss.backward()
        _REFERENCES[key] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    return _REFERENCES[key]


def check(name, schedule, p, m, checkpoint, dtype, tol):
    kwargs = {"num_chunks": 2} if schedule == "interleaved-1f1b" else {}
    try:
        schedules.build(schedule, num_stages=p, num_microbatches=m, **kwargs)
    except Exception as err:  # the schedule forbids this shape: say why
        pytest.skip(f"{schedule} p={p} m={m}: {err}")
    ref_loss, ref_grads = reference(name, dtype)
    model, x, y, loss_fn = make(name, dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline(model, p, schedule=schedule, num_microbatches=m, loss_fn=loss_fn,
                    checkpoint=checkpoint, **kwargs)
    assert model.state_dict().keys() == state.keys()
    loss = pipe.step(x, y)
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    for (pname, param), g in zip(model.named_parameters(), ref_grads):
        assert param.grad is not None, pname
        err = (param.grad - g).norm() / g.norm().clamp_min(1e-30)
        assert err <= tol, f"{pname}: relative error {err:.3g}"
    for k, v in model.state_dict().items():   # wrapping and stepping leave the weights alone
        assert torch.equal(v, state[k]), k
    pipe.close()


@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["mlp", "transformer", "unequal"])
def test_float64_matches_unsplit(name, schedule, p, m, checkpoint):
    # fp64: the pipeline differs from the reference only in summation order (micro-batch
    # gradients summed), so errors are ~1e-16 relative; 1e-10 leaves ample room.
    check(name, schedule, p, m, checkpoint, torch.float64, 1e-10)


@pytest.mark.parametrize("checkpoint", ["never", "always"])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 3)])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["mlp", "transformer", "unequal"])
def test_float32_matches_unsplit(name, schedule, p, m, checkpoint):
    # fp32 eps is 1.2e-7; re-ordered sums over 8 samples and a few layers stay well below
    # 1e-5 relative.
    check(name, schedule, p, m, checkpoint, torch.float32, 1e-5)
