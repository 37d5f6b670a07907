"""The losses a plan may name: a small fixed set, applied by fedcore's own training loop.

A plan is the model's graph only; the loss is named, never shipped, so a data owner knows
exactly what is optimized on their records. ``cross_entropy`` is what registered models use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fedcore.errors import ConfigError

__all__ = ["DEFAULT_LOSS", "LOSSES", "DeclaresLoss", "loss_function", "loss_of"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_LOSS = "cross_entropy"


def _mse(outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    # Integer class labels are compared with one-hot vectors of the outputs' width.
    if not targets.is_floating_point():
        targets = nn.functional.one_hot(targets.long(), outputs.shape[-1])
    target = targets.to(outputs.dtype).reshape(outputs.shape)
    per_example = ((outputs - target) ** 2).flatten(1).mean(1)
    return per_example.sum() if reduction == "sum" else per_example.mean()


#: Loss name -> what it computes, in words (shown to data owners by ``fed-plan show``).
LOSSES: dict[str, str] = {
    "cross_entropy": "softmax cross-entropy of the outputs against integer class labels",
    "mse": "mean squared error of the outputs against the targets (class labels one-hot)",
}


def loss_function(name: str, *, reduction: str = "mean") -> LossFn:
    """The loss called ``name`` (see :data:`LOSSES`), averaged or summed over the batch."""
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(reduction=reduction)
    if name == "mse":
        return lambda outputs, targets: _mse(outputs, targets, reduction)
    raise ConfigError(f"unknown loss {name!r}; fedcore's losses: {', '.join(LOSSES)}")


@runtime_checkable
class DeclaresLoss(Protocol):
    """A model that says which of fedcore's losses trains it (a plan's model does)."""

    @property
    def fedcore_loss(self) -> str: ...


def loss_of(model: object) -> str:
    """The loss ``model`` declares, or :data:`DEFAULT_LOSS`."""
    return model.fedcore_loss if isinstance(model, DeclaresLoss) else DEFAULT_LOSS
