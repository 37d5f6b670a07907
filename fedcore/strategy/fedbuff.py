"""FedBuff: asynchronous buffered aggregation (Nguyen et al., "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022).

Workers train continuously, each on the newest global model when it becomes free. Every
result is a delta from the model it was trained from, down-weighted by its staleness ``s``
(the number of global updates since then) with ``(1 + s) ** -staleness_exponent`` (0.5 gives
the paper's ``1/sqrt(1 + s)``). Once ``buffer_size`` results are buffered the global model
moves by ``server_lr`` times their mean; results older than ``max_staleness`` are dropped.
The buffer is a running sum: coordinator memory stays O(model size) for the aggregation
itself (the coordinator also keeps each model version some worker is still training from).
"""

from __future__ import annotations

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .accumulate import ExactSum
from .base import AsyncSettings, Strategy, UpdateAggregator

__all__ = ["FedBuff", "StalenessWeightedAggregator"]


class StalenessWeightedAggregator(UpdateAggregator):
    """``global + server_lr * mean_k(weight(s_k) * (update_k - global))``, summed exactly
    (:class:`~.accumulate.ExactSum`): the buffer's order of arrival does not change the result.
    """

    def __init__(self, global_weights: Weights, *, server_lr: float, exponent: float) -> None:
        self._global = global_weights
        self._server_lr = server_lr
        self._exponent = exponent
        self._sum = ExactSum()

    def weight(self, staleness: int) -> float:
        """The factor of an update ``staleness`` global updates old."""
        return float((1.0 + staleness) ** -self._exponent)

    @property
    def count(self) -> int:
        return self._sum.count

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        # Each delta is computed on its own (float64, exact for float32 tensors), so it does
        # not depend on the other updates either.
        deltas = {
            name: np.subtract(array, self._global[name], dtype=np.float64)
            for name, array in update.items()
        }
        self._sum.add(deltas, self.weight(staleness))

    def result(self) -> Weights:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        out: Weights = {}
        for name, total in self._sum.total(self.count).items():
            g: np.ndarray = self._global[name]
            mean: np.ndarray = total  # float64
            new = g + self._server_lr * mean
            out[name] = new.astype(g.dtype) if g.dtype.kind == "f" else np.rint(new).astype(g.dtype)
        return out


class FedBuff(Strategy):
    """Buffered asynchronous aggregation (Nguyen et al., AISTATS 2022); see the module doc.

    Each update carries its own staleness weight, so FedBuff needs individual updates and is
    refused with secure aggregation.
    """

    needs_individual_updates = True

    def __init__(
        self,
        *,
        buffer_size: int = 2,
        max_staleness: int = 10,
        server_lr: float = 1.0,
        staleness_exponent: float = 0.5,
    ) -> None:
        if not server_lr > 0:
            raise ConfigError(f"server-lr must be positive, got {server_lr}")
        if staleness_exponent < 0:
            raise ConfigError(f"staleness-exponent cannot be negative, got {staleness_exponent}")
        self._settings = AsyncSettings(buffer_size, max_staleness)
        self.server_lr = server_lr
        self.staleness_exponent = staleness_exponent

    @property
    def async_settings(self) -> AsyncSettings:
        return self._settings

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return StalenessWeightedAggregator(
            global_weights, server_lr=self.server_lr, exponent=self.staleness_exponent
        )
