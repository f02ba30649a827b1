"""Small models and helpers shared by several test files."""

from __future__ import annotations

import torch
import torch.nn as nn


class ResidualBlock(nn.Module):
    """BasicBlock-like: conv-BN-ReLU-conv-BN, residual add, the same ReLU module called twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class SmallNet(nn.Module):
    """Stem, a residual block, pooling and an MLP head with a functional ReLU (4 sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.block = ResidualBlock(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = self.block(self.act(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class FunctionalMLP(nn.Module):
    """fc1 -> torch.relu -> fc2: a functional site in the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoSites(nn.Module):
    """Site `a`: always ON (zero entropy); site `b`: 8 channels ON about half the time."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 3)
        self.a = nn.ReLU()
        self.fb = nn.Linear(3, 8)
        self.b = nn.ReLU()
        with torch.no_grad():
            self.fa.weight.mul_(0.01)
            self.fa.bias.fill_(50.0)
            self.fb.bias.zero_()

    def forward(self, x):
        return self.b(self.fb(self.a(self.fa(x)) - 50.0 + x[:, :3]))


def gaussian_batches(n: int, size: int, seed: int = 0, features: int = 4) -> list[torch.Tensor]:
    """``n`` batches of ``size`` standard-normal rows of ``features`` values (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, features, generator=g) for _ in range(n)]



def spawn_two_ranks(worker, path: str) -> list:
    """Run ``worker(rank, world=2, port, path)`` in two processes on a free local port (gloo),
    and return what rank 0 saved to ``path`` with ``torch.save``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, path), nprocs=2, join=True)
    return torch.load(path, weights_only=True)


class Identityish(nn.Module):
    """conv 1x1 with identity weights, so the site sees exactly the input."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))
