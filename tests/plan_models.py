"""Plan models for the plan-runtime tests: honest ones and ones a hostile data scientist or
coordinator would ship (each exports and passes today's verifier)."""

from __future__ import annotations

import torch
from plan_attacks import raw_program
from torch import nn

from fedcore.plans import Plan, export_plan

EXAMPLE = torch.zeros(2, 1, 28, 28)


class RowInBuffer(nn.Module):
    """Copies the first training row of each batch into a buffer named like a statistic."""

    running_mean: torch.Tensor  # registered as a buffer below

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)
        self.register_buffer("running_mean", torch.zeros(784))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        self.running_mean.mul_(0).add_(flat[0])
        out: torch.Tensor = self.linear(flat)
        return out


class BatchNormNet(nn.Module):
    """An honest model with batch normalisation: its running statistics are uploaded."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(784)
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.norm(x.flatten(1)))
        return out


class OverwritesInput(nn.Module):
    """Evaluates honestly, then overwrites its input batch with 7s (in evaluation mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.flatten(1))
        if not self.training:
            x.mul_(0).add_(7)
        return out


def plan_of(module: nn.Module, *, verified: bool = True) -> Plan:
    """``module`` as a plan: through ``export_plan`` (which refuses what a worker's verifier
    would), or, ``verified=False``, packed as a hostile coordinator would, unverified, to
    test the runtime's own rules behind the verifier."""
    torch.manual_seed(0)
    if verified:
        return export_plan(module, EXAMPLE)
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return Plan(raw_program(module, EXAMPLE), state)


class MemoryHog(nn.Module):
    """Honest-looking, with an activation of 4,000 copies of each example (12.5 MB each)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        spread = flat.repeat(1, 4000).sum(1, keepdim=True)
        out: torch.Tensor = self.linear(flat) + 0 * spread
        return out
