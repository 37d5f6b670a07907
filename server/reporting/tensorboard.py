"""``--tensorboard-dir``: every round's metrics as TensorBoard event files.

Each round's :meth:`~.metrics.RoundMetrics.scalars` become scalars at step = round, written
with PyTorch's ``SummaryWriter`` (which needs the ``tensorboard`` package, imported only when
this sink is used). ``tensorboard --logdir DIR`` shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcore.errors import ConfigError

from .metrics import CoordinatorStatus, RoundMetrics

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """A :class:`~.sink.Sink` that writes TensorBoard event files into ``directory``."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard-dir needs TensorBoard: pip install 'fedcore[tracking]'"
            ) from None
        try:
            self._writer = SummaryWriter(str(directory))
        except OSError as exc:
            raise ConfigError(f"cannot write TensorBoard events to {directory}: {exc}") from None

    def update(self, status: CoordinatorStatus) -> None:
        pass

    def round_completed(self, metrics: RoundMetrics) -> None:
        for name, value in metrics.scalars().items():
            self._writer.add_scalar(name, value, metrics.round)
        self._writer.flush()

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        self._writer.close()
