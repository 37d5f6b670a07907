"""fedcore's worker runtime (``fedcore.worker``): runs plans on local data, never shares it."""

from __future__ import annotations

from .policy import PolicyGuard
from .runtime import Worker, WorkerState
from .trainer import EchoTrainer, EvalOutput, FitOutput, TorchTrainer, Trainer, TrainingFailed

__all__ = [
    "EchoTrainer",
    "EvalOutput",
    "FitOutput",
    "PolicyGuard",
    "TorchTrainer",
    "Trainer",
    "TrainingFailed",
    "Worker",
    "WorkerState",
]
