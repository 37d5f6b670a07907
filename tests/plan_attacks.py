"""Plans an attacker running the coordinator would ship, built with the attacker's own tools.

:func:`raw_program` exports a module with ``torch.export`` and packs it as a
:class:`PlanProgram` *without* fedcore's verifier (``export_plan`` would refuse these), the
way a hostile coordinator can. The modules are the attacks of issue 23 and honest controls.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedcore.plans import plan_hash
from fedcore.plans.format import FORMAT_VERSION
from fedcore.v1 import fedcore_pb2 as pb

__all__ = [
    "EmptyLeak",
    "FullAsk",
    "GrowsWithBatchSquared",
    "InputOverwrite",
    "RowInBuffer",
    "raw_program",
    "retouch",
]


def _graph(module: nn.Module, example: torch.Tensor, *, training: bool) -> bytes:
    from torch._export.serde.serialize import serialize
    from torch.export import Dim, export

    module.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export(
            module, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=1 << 20)},)
        )
        doc = json.loads(serialize(program).exported_program)
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    return json.dumps(doc, sort_keys=True).encode()


def raw_program(
    module: nn.Module, example: torch.Tensor, *, name: str = "attack"
) -> pb.PlanProgram:
    """``module`` as a plan program, unverified (its constants must be empty)."""
    program = pb.PlanProgram(
        format_version=FORMAT_VERSION,
        name=name,
        train_graph=_graph(module, example, training=True),
        eval_graph=_graph(module, example, training=False),
        loss="cross_entropy",
    )
    program.hash = plan_hash(program)
    return program


def retouch(
    program: pb.PlanProgram, change: Callable[[dict[str, Any]], None], *, both: bool = True
) -> pb.PlanProgram:
    """A copy of ``program`` with ``change`` applied to its graphs' JSON, re-hashed."""
    out = pb.PlanProgram()
    out.CopyFrom(program)
    for field in ("train_graph", "eval_graph") if both else ("train_graph",):
        doc = json.loads(getattr(out, field))
        change(doc)
        setattr(out, field, json.dumps(doc).encode())
    out.hash = plan_hash(out)
    return out


class RowInBuffer(nn.Module):
    """Attack 1: a buffer named like normalisation statistics receives a training row,
    through an in-place write on a view (torch.export records no buffer mutation)."""

    running_mean: torch.Tensor  # registered as a buffer below

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.register_buffer("running_mean", torch.zeros(784))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running_mean.mul_(0).add_(x.flatten(1)[0])
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


class EmptyLeak(nn.Module):
    """Attack 2: uninitialised memory (the worker's freed heap) copied into a buffer."""

    stats: torch.Tensor  # registered as a buffer below

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.register_buffer("stats", torch.zeros(4096, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.copy_(torch.empty_like(self.stats))
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


class FullAsk(nn.Module):
    """Attack 3's carrier: an honest ``aten.full`` of 7 elements, whose size argument a
    hostile coordinator then changes (the declared metadata still says [7])."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.full((7,), 0.0).sum()  # type: ignore[no-any-return]


class InputOverwrite(nn.Module):
    """Attack 5 at the verifier: the batch (a view of the silo's dataset) is overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0).add_(7)
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


class GrowsWithBatchSquared(nn.Module):
    """A tensor of batch x batch elements: small when exported, enormous at batch 10^6."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return self.fc(h) + (h @ h.t()).mean()  # type: ignore[no-any-return]
