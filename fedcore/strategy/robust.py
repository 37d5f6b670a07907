"""Robust aggregation against faulty or malicious workers.

Coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018); Krum and Multi-Krum (Blanchard et al.,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

These rules must see every update, so they declare ``update_access = UpdateAccess.WHOLE`` and
their aggregator *buffers all of a round's updates*: coordinator memory is O(workers x model
size) (each upload is staged whole in an upload slot, then kept), unlike the streaming FedAvg
family. The coordinate-wise rules could run chunk range by chunk range across workers
(O(workers x chunk)); that needs every upload in lockstep and is not built. They
declare ``needs_individual_updates`` and cannot run with secure aggregation. Example counts
are ignored: a worker's weight in the result cannot be bought by claiming more examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedcore.errors import ConfigError, RoundFailedError
from fedcore.weights import Weights

from .base import Strategy, UpdateAggregator

__all__ = [
    "BufferingAggregator",
    "CoordinateMedian",
    "Krum",
    "MultiKrum",
    "TrimmedMean",
    "krum_select",
]

Rule = Callable[[list[Weights]], Weights]


class BufferingAggregator(UpdateAggregator):
    """Keeps every update, then applies ``rule`` to all of them at once."""

    def __init__(self, rule: Rule) -> None:
        self._rule = rule
        self._updates: list[Weights] = []

    @property
    def count(self) -> int:
        return len(self._updates)

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        self._updates.append(update)

    def result(self) -> Weights:
        if not self._updates:
            raise ValueError("no updates to aggregate")
        updates, self._updates = self._updates, []
        return self._rule(updates)


def _per_coordinate(updates: list[Weights], combine: Callable[[np.ndarray], np.ndarray]) -> Weights:
    """Apply ``combine`` to each tensor stacked along a new axis 0; integers round back."""
    out: Weights = {}
    for name, first in updates[0].items():
        stacked = np.stack([u[name] for u in updates])
        if first.dtype.kind != "f":
            stacked = stacked.astype(np.float64)
        value = combine(stacked)
        out[name] = (
            value.astype(first.dtype)
            if first.dtype.kind == "f"
            else np.rint(value).astype(first.dtype)
        )
    return out


class CoordinateMedian(Strategy):
    """Coordinate-wise median of the updates (Yin et al., ICML 2018)."""

    needs_individual_updates = True

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return BufferingAggregator(lambda us: _per_coordinate(us, lambda s: np.median(s, axis=0)))


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
    ``floor(beta * n)`` largest and smallest values and average the rest."""

    needs_individual_updates = True

    def __init__(self, *, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ConfigError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def _combine(self, updates: list[Weights]) -> Weights:
        n = len(updates)
        k = math.floor(self.beta * n)

        def trimmed(stacked: np.ndarray) -> np.ndarray:
            kept: np.ndarray = np.sort(stacked, axis=0)[k : n - k]
            return kept.mean(axis=0)  # type: ignore[no-any-return]

        return _per_coordinate(updates, trimmed)

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return BufferingAggregator(self._combine)


def krum_select(updates: list[Weights], num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` updates with the lowest Krum score: the sum of squared
    distances to their ``n - f - 2`` nearest neighbours (over all floating parameters)."""
    n = len(updates)
    if n < 2 * num_byzantine + 3:
        raise RoundFailedError(
            f"Krum with num-byzantine={num_byzantine} needs at least {2 * num_byzantine + 3} "
            f"updates, got {n}; run with more workers (--min-workers) or lower num-byzantine"
        )
    names = [k for k, a in updates[0].items() if a.dtype.kind == "f"]
    flat = [np.concatenate([u[k].ravel().astype(np.float64) for k in names]) for u in updates]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i] - flat[j]
            dist[i, j] = dist[j, i] = float(diff @ diff)
    neighbours = n - num_byzantine - 2
    scores = [np.sort(np.delete(dist[i], i))[:neighbours].sum() for i in range(n)]
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]


class Krum(Strategy):
    """Krum (Blanchard et al., NeurIPS 2017): the update closest to its ``n - f - 2`` nearest
    neighbours becomes the global model. Tolerates ``f = num_byzantine`` arbitrary updates
    among ``n >= 2f + 3``."""

    needs_individual_updates = True

    def __init__(self, *, num_byzantine: int = 1) -> None:
        if num_byzantine < 0:
            raise ConfigError(f"num-byzantine cannot be negative, got {num_byzantine}")
        self.num_byzantine = num_byzantine

    @property
    def required_updates(self) -> int:
        return 2 * self.num_byzantine + 3

    def _num_selected(self, n: int) -> int:
        return 1

    def _combine(self, updates: list[Weights]) -> Weights:
        chosen = krum_select(updates, self.num_byzantine, self._num_selected(len(updates)))
        return _per_coordinate([updates[i] for i in chosen], lambda s: s.mean(axis=0))

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return BufferingAggregator(self._combine)


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the mean of the ``m`` updates with the
    best Krum scores (default ``m = n - f``)."""

    def __init__(self, *, num_byzantine: int = 1, num_selected: int = 0) -> None:
        super().__init__(num_byzantine=num_byzantine)
        if num_selected < 0:
            raise ConfigError(f"num-selected cannot be negative, got {num_selected}")
        self.num_selected = num_selected

    def _num_selected(self, n: int) -> int:
        return min(self.num_selected, n) if self.num_selected else n - self.num_byzantine
