"""An example custom strategy: FedAvg with norm clipping of each update, and early stopping.

Run it with the update clipped to norm 5 and a stop at 90% test accuracy::

    PYTHONPATH=examples fed-server --strategy clipped_fedavg:ClippedFedAvg \\
        --strategy-options '{"max-norm": 5, "target-accuracy": 0.9}' --eval-data test.npz

or put the options in the ``--config`` file::

    [strategy]
    name = "clipped_fedavg:ClippedFedAvg"
    max-norm = 5
    target-accuracy = 0.9
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcore import (
    Failure,
    FitResult,
    Strategy,
    UpdateAggregator,
    WeightedMeanAggregator,
    Weights,
)


class ClippingAggregator(UpdateAggregator):
    """Clips each update's distance to the global model, then streams it into a weighted
    mean (memory stays one model-sized sum)."""

    def __init__(self, global_weights: Weights, max_norm: float) -> None:
        self.global_weights = global_weights
        self.max_norm = max_norm
        self.mean = WeightedMeanAggregator()
        self.clipped = 0

    @property
    def count(self) -> int:
        return self.mean.count

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        deltas = {k: u - self.global_weights[k] for k, u in update.items() if u.dtype.kind == "f"}
        norm = float(np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in deltas.values())))
        if norm > self.max_norm:
            self.clipped += 1
            scale = self.max_norm / norm
            for k, d in deltas.items():
                update[k] = (self.global_weights[k] + scale * d).astype(d.dtype)
        self.mean.add(update, num_examples)

    def result(self) -> Weights:
        return self.mean.result()


class ClippedFedAvg(Strategy):
    """FedAvg over updates clipped to ``max_norm``; ends the federation once the centralized
    test accuracy reaches ``target_accuracy``."""

    # Clipping looks at each update, so this strategy cannot run with secure aggregation.
    needs_individual_updates = True
    # on_round_end may stop the federation: each round's evaluation comes before the next.
    may_stop_early = True

    def __init__(self, *, max_norm: float = 10.0, target_accuracy: float = 1.0) -> None:
        self.max_norm = max_norm
        self.target_accuracy = target_accuracy
        self.rounds_with_clipping = 0

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        self._aggregator = ClippingAggregator(global_weights, self.max_norm)
        return self._aggregator

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Sequence[FitResult],
        failures: Sequence[Failure],
    ) -> Weights:
        if self._aggregator.clipped:
            self.rounds_with_clipping += 1
        return aggregate

    def on_round_end(self, round_number: int, weights: Weights, metrics: Mapping[str, Any]) -> bool:
        accuracy = metrics.get("accuracy")
        return accuracy is not None and accuracy >= self.target_accuracy

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_with_clipping": self.rounds_with_clipping}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds_with_clipping = int(state["rounds_with_clipping"])
