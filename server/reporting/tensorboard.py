"""``--tensorboard-dir``: every round's metrics as TensorBoard event files.

Each round's :meth:`~.metrics.RoundMetrics.scalars` become scalars at step = round, written
with PyTorch's ``SummaryWriter`` (which needs the ``tensorboard`` package, imported only when
this sink is used) into a subdirectory of ``DIR`` per federation (:func:`~.sink.run_name`), so
two runs into one directory stay two runs. ``tensorboard --logdir DIR`` shows them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fedcore.errors import ConfigError

from .metrics import CoordinatorStatus, RoundMetrics

__all__ = ["TensorBoardSink"]

log = logging.getLogger("fedcore.server")


class TensorBoardSink:
    """A :class:`~.sink.Sink` that writes TensorBoard event files into ``directory/run``
    (``run-2``, ``run-3``... if that subdirectory exists: one run never merges into another).
    """

    def __init__(self, directory: Path, run: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard-dir needs TensorBoard: pip install 'fedcore[tracking]'"
            ) from None
        path, n = directory / run, 1
        while path.exists():
            n += 1
            path = directory / f"{run}-{n}"
        try:
            self._writer = SummaryWriter(str(path))
        except OSError as exc:
            raise ConfigError(f"cannot write TensorBoard events to {path}: {exc}") from None
        #: Where this run's event files are.
        self.path = path
        log.info("writing TensorBoard events to %s", path)

    def update(self, status: CoordinatorStatus) -> None:
        pass

    def round_completed(self, metrics: RoundMetrics) -> None:
        for name, value in metrics.scalars().items():
            self._writer.add_scalar(name, value, metrics.round)
        self._writer.flush()

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        self._writer.close()
