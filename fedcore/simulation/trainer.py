"""A virtual worker's trainer: the deployment's :class:`~fedcore.worker.TorchTrainer`, built
for each task and released after it.

A deployed worker keeps its model (and its shard as float tensors) alive between rounds; a
thousand virtual workers doing that would cost a thousand models. Here a client holds only
its index array; each task materializes its shard, builds a ``TorchTrainer`` (which builds
the model), runs the task through it -- the same ``fit``/``evaluate`` code a ``fed-worker``
runs -- and drops everything. What persists per client is what must: its DP-SGD accountant
(the ``train_fn``), its policy guard and ledger, and the worker runtime's own state.

A host-wide semaphore bounds how many of its clients train at once, so memory is bounded by
``concurrency`` models whatever the number of clients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch.utils.data import Dataset

from fedcore.plan import ModelSpec, TrainConfig
from fedcore.training import Batch
from fedcore.weights import Weights
from fedcore.worker import EvalOutput, FitOutput, TorchTrainer, Trainer
from fedcore.worker.trainer import TrainFn

__all__ = ["TransientTrainer"]


class TransientTrainer(Trainer):
    """Runs each task on a fresh :class:`~fedcore.worker.TorchTrainer`, one slot at a time.

    Args:
        shard: makes the client's training set (called once per task).
        num_examples: its size, advertised in the hello without building it.
        slots: shared by the host's clients; a task holds one while its model is alive.
        device: as ``fed-worker --device``.
        train_fn: the client's own training loop (a DP-SGD loop keeps its accountant).
    """

    def __init__(
        self,
        shard: Callable[[], Dataset[Batch]],
        num_examples: int,
        slots: threading.Semaphore,
        *,
        device: str = "cpu",
        train_fn: TrainFn | None = None,
    ) -> None:
        self._shard = shard
        self._num_examples = num_examples
        self._slots = slots
        self._device = device
        self._train_fn = train_fn
        self._count = threading.Lock()
        #: Tasks run so far.
        self.tasks = 0

    @property
    def num_examples(self) -> int:
        return self._num_examples

    def _trainer(self) -> TorchTrainer:
        if self._train_fn is None:
            return TorchTrainer(self._shard(), device=self._device)
        return TorchTrainer(self._shard(), device=self._device, train_fn=self._train_fn)

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        with self._slots:
            self._counted()
            return self._trainer().fit(model, weights, config)

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        with self._slots:
            self._counted()
            return self._trainer().evaluate(model, weights)

    def _counted(self) -> None:
        with self._count:
            self.tasks += 1
