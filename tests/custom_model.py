"""A user's own model, outside fedcore's registry: ``custom_model:make``."""

from __future__ import annotations

from torch import nn


def make(hidden: int = 8) -> nn.Module:
    """A one-hidden-layer MLP on flattened 28x28 images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
