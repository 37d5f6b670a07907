"""fedcore's worker runtime (``fedcore.worker``): runs plans on local data, never shares it."""

from __future__ import annotations

from .gate import CheckedTask, Gate
from .policy import PolicyGuard
from .runtime import Worker, WorkerState
from .trainer import EchoTrainer, EvalOutput, FitOutput, TorchTrainer, Trainer, TrainingFailed

__all__ = [
    "CheckedTask",
    "EchoTrainer",
    "EvalOutput",
    "FitOutput",
    "Gate",
    "PolicyGuard",
    "TorchTrainer",
    "Trainer",
    "TrainingFailed",
    "Worker",
    "WorkerState",
]
