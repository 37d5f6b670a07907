"""fedcore's worker runtime (``fedcore.worker``): runs plans on local data, never shares it.

The names below load on first use (PEP 562): the runtime needs torch, which takes seconds to
import, and ``fed-worker requests`` (the data owner's queue) must not wait for it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .gate import CheckedTask, Gate
    from .policy import PolicyGuard
    from .runtime import Worker, WorkerState
    from .trainer import EchoTrainer, EvalOutput, FitOutput, TorchTrainer, Trainer, TrainingFailed

_HOME = {
    "CheckedTask": "gate",
    "Gate": "gate",
    "PolicyGuard": "policy",
    "Worker": "runtime",
    "WorkerState": "runtime",
    "EchoTrainer": "trainer",
    "EvalOutput": "trainer",
    "FitOutput": "trainer",
    "TorchTrainer": "trainer",
    "Trainer": "trainer",
    "TrainingFailed": "trainer",
}

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)
