"""Robust aggregation against faulty or malicious workers.

Coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018); Krum and Multi-Krum (Blanchard et al.,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

These rules must see every update. The coordinate-wise rules (median, trimmed mean) stream
(``update_access = UpdateAccess.STREAM``): each upload is spooled to an unlinked temporary file
as its chunks arrive (:mod:`.spool`), and once the round's uploads are in, the rule runs range
by range across them, reading :data:`~.spool.RANGE_BYTES` of each update at a time. The result
is the whole-update rule's, bit for bit; the coordinator holds O(workers x range) plus the
result, and the disk one model per update. Krum and Multi-Krum need every pair of whole
updates for their distances, so they declare ``UpdateAccess.WHOLE`` and buffer all of a
round's updates in memory: O(workers x model). All of them declare
``needs_individual_updates`` and cannot run with secure aggregation. Example counts are
ignored: a worker's weight in the result cannot be bought by claiming more examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedcore.errors import ConfigError, RoundFailedError
from fedcore.weights import Weights

from .base import Layout, PieceSink, Strategy, StreamingAggregator, UpdateAggregator
from .spool import RANGE_BYTES, SpooledUpdate
from .streaming import UpdateAccess

__all__ = [
    "BufferingAggregator",
    "CoordinateMedian",
    "Krum",
    "MultiKrum",
    "SpoolingAggregator",
    "TrimmedMean",
    "krum_select",
]

Rule = Callable[[list[Weights]], Weights]
#: A coordinate-wise rule: values stacked along axis 0 (one row per update; integers as
#: float64) -> one value per column.
Combine = Callable[[np.ndarray], np.ndarray]


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


class SpoolingAggregator(StreamingAggregator):
    """Spools every update to disk as it arrives, then applies the coordinate-wise
    ``combine`` range by range across all of them (see the module doc).

    A whole update (``add``) is spooled the same way, so memory does not depend on how the
    updates arrived.
    """

    def __init__(self, combine: Combine, *, spool_dir: str | None = None) -> None:
        self._combine = combine
        self._spool_dir = spool_dir
        self._layout: Layout | None = None
        self._open: set[PieceSink] = set()
        self._done: list[SpooledUpdate] = []

    @property
    def count(self) -> int:
        return len(self._done)

    def expect(self, total_weight: float) -> None:
        """Example counts do not weigh in these rules: nothing to budget."""

    def _spool(self, layout: Layout) -> SpooledUpdate:
        if self._layout is None:
            self._layout = dict(layout)
        elif layout != self._layout:
            raise ValueError("every update of a round must have the same tensors")
        return SpooledUpdate(layout, spool_dir=self._spool_dir)

    def open(self, layout: Layout, num_examples: int) -> PieceSink:
        spool = self._spool(layout)
        self._open.add(spool)
        return spool

    def commit(self, stream: PieceSink, num_examples: int) -> bool:
        self._open.discard(stream)
        if not isinstance(stream, SpooledUpdate):
            raise TypeError("a stream this aggregator did not open cannot be committed")
        if not stream.commit():
            return False
        self._done.append(stream)
        return True

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        spool = self._spool({name: (a.shape, a.dtype) for name, a in update.items()})
        for name, array in update.items():
            spool.fold(name, 0, array)
        spool.commit()
        self._done.append(spool)

    def result(self) -> Weights:
        for stream in self._open:  # an upload still under way never counts
            stream.abort()
        self._open.clear()
        done, self._done = self._done, []
        if not done:
            raise ValueError("no updates to aggregate")
        assert self._layout is not None
        try:
            out: Weights = {}
            for name, (shape, dtype) in self._layout.items():
                size = int(np.prod(shape, dtype=np.int64))
                flat = np.empty(size, dtype=dtype)
                step = max(1, RANGE_BYTES // max(dtype.itemsize, 8))
                for lo in range(0, size, step):
                    hi = min(lo + step, size)
                    stacked = np.stack([u.read(name, lo, hi - lo) for u in done])
                    flat[lo:hi] = _combined(stacked, dtype, self._combine)
                out[name] = flat.reshape(shape)
            return out
        finally:
            for update in done:
                update.close()


def _combined(stacked: np.ndarray, dtype: np.dtype[np.generic], combine: Combine) -> np.ndarray:
    """``combine`` over axis 0 in the tensor's dtype; integers go through float64 and round."""
    if dtype.kind != "f":
        return np.rint(combine(stacked.astype(np.float64))).astype(dtype)
    return combine(stacked).astype(dtype)


def _median(stacked: np.ndarray) -> np.ndarray:
    return np.median(stacked, axis=0)  # type: ignore[no-any-return]


def _trimmed(beta: float) -> Combine:
    def trimmed(stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        k = math.floor(beta * n)
        kept: np.ndarray = np.sort(stacked, axis=0)[k : n - k]
        return kept.mean(axis=0)  # type: ignore[no-any-return]

    return trimmed


def _per_coordinate(updates: list[Weights], combine: Combine) -> Weights:
    """Apply ``combine`` to each whole tensor stacked along a new axis 0 (Krum's mean)."""
    return {
        name: _combined(np.stack([u[name] for u in updates]), first.dtype, combine)
        for name, first in updates[0].items()
    }


class CoordinateMedian(Strategy):
    """Coordinate-wise median of the updates (Yin et al., ICML 2018); streams through a
    spool (:class:`SpoolingAggregator`)."""

    needs_individual_updates = True
    update_access = UpdateAccess.STREAM

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return SpoolingAggregator(_median)


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
    ``floor(beta * n)`` largest and smallest values and average the rest; streams through a
    spool (:class:`SpoolingAggregator`)."""

    needs_individual_updates = True
    update_access = UpdateAccess.STREAM

    def __init__(self, *, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ConfigError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return SpoolingAggregator(_trimmed(self.beta))


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
    among ``n >= 2f + 3``. Needs whole updates (pairwise distances over every parameter):
    the coordinator holds the round's updates in memory, O(workers x model)."""

    needs_individual_updates = True
    update_access = UpdateAccess.WHOLE

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
