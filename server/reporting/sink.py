"""The one reporting interface: what every sink of the coordinator's progress implements.

The coordinator publishes a :class:`CoordinatorStatus` snapshot a few times a second, and the
report pipeline every completed round's :class:`~.metrics.RoundMetrics`, to its sinks: the
JSONL metrics file and table rows, the live panel or the plain summary, Prometheus, MLflow, TensorBoard.
Sinks never reach into the coordinator; every call comes from the event loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Protocol

from .metrics import CoordinatorStatus, RoundMetrics

__all__ = ["CoordinatorStatus", "Sink", "run_name"]


class Sink(Protocol):
    """Receives the coordinator's status and completed rounds."""

    def update(self, status: CoordinatorStatus) -> None:
        """The federation's progress now (a few times a second)."""
        ...

    def round_completed(self, metrics: RoundMetrics) -> None:
        """A round completed and was evaluated."""
        ...

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        """The federation is over (``rows``: every round, restored ones included)."""
        ...


def run_name(model: str, strategy: str, started: float | None = None) -> str:
    """The name of one federation's run in the experiment trackers (the MLflow run's name and
    the TensorBoard run's subdirectory): local start time, model and strategy, e.g.
    ``20261207-131500-mnist-cnn-fedavg``; characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_`` (a model may be named by a path)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{stamp}-{model}-{strategy}")
