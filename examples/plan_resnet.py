"""A small residual network for MNIST that is in no registry: federate it as a plan.

The workers never see this file. ``fed-plan export examples.plan_resnet:make_model --out
resnet.plan`` turns it into a graph of ATen operations plus weights; ``fed-server --plan
resnet.plan`` ships that to workers started without ``--model``. It uses what registered
models do not: batch normalization (running statistics, a different evaluation graph),
dropout, residual additions and global average pooling. See ``examples/plan_federation.py``
for the whole federation, and ``docs/plans.md``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallResNet", "make_model"]


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class SmallResNet(nn.Module):
    """stem conv3x3(width) -> maxpool -> 2 residual blocks -> global average pool -> fc."""

    def __init__(self, width: int = 16, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(_Block(width), nn.MaxPool2d(2), _Block(width))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.max_pool2d(self.stem(x), 2))
        return self.head(self.dropout(x.mean(dim=(2, 3))))  # type: ignore[no-any-return]


def make_model(width: int = 16, num_classes: int = 10, dropout: float = 0.1) -> nn.Module:
    """The factory ``fed-plan export`` calls (keyword arguments from ``--params``)."""
    return SmallResNet(width, num_classes, dropout)
