"""fedcore's worker runtime (``fedcore.worker``): runs plans on local data, never shares it."""

from __future__ import annotations

from .runtime import Worker, WorkerState
from .trainer import EvalOutput, FitOutput, TorchTrainer, Trainer, TrainingFailed

__all__ = [
    "EvalOutput",
    "FitOutput",
    "TorchTrainer",
    "Trainer",
    "TrainingFailed",
    "Worker",
    "WorkerState",
]
