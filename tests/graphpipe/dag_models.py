"""Multi-branch models for the runtime tests (small, fp64-friendly)."""

import torch
from torch import nn

D = 8


def _mlp(depth, width=D):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Two towers of unequal depth (text 4 layers, image 1) merged by a head."""

    def __init__(self):
        super().__init__()
        self.text_enc, self.image_enc = _mlp(4), _mlp(1)
        self.head = nn.Linear(2 * D, D)

    def forward(self, text, image):
        return self.head(torch.cat([self.text_enc(text), self.image_enc(image)], -1))


class Skip(nn.Module):
    """A chain with a skip connection from the first layer to the last (crosses every cut)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(D, D)
        self.body = _mlp(5)
        self.last = nn.Linear(D, D)

    def forward(self, x):
        h = self.first(x)
        return self.last(self.body(h) + h)


class FourBranch(nn.Module):
    """Four parallel branches of different widths and depths, summed after projection."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(D, D)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(D, w), nn.Tanh(), *[m for _ in range(k) for m in (nn.Linear(w, w), nn.Tanh())],
                          nn.Linear(w, D))
            for w, k in ((4, 0), (8, 1), (16, 2), (32, 3)))

    def forward(self, x):
        h = self.stem(x)
        return sum(b(h) for b in self.branches)


class SharedBranch(nn.Module):
    """A branch whose output feeds two later stages (and a second input used late)."""

    def __init__(self):
        super().__init__()
        self.a = _mlp(2)
        self.b = _mlp(2)
        self.c = _mlp(2)
        self.out = nn.Linear(2 * D, D)

    def forward(self, x, z):
        h = self.a(x)
        return self.out(torch.cat([self.b(h) * z, self.c(h) + h], -1))


def mse(out, y):
    return ((out - y) ** 2).mean()
