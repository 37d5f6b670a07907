"""Strategies decide who trains, with what settings, and how results are combined.

A strategy never touches gRPC. The coordinator's round loop calls its hooks::

    configure_fit(round, workers, config)        -> which workers train, and with what config
    start_aggregation(round, global_weights)     -> a streaming UpdateAggregator for the round
        aggregator.add(update, num_examples)     ... once per valid result, as they arrive
    aggregate_fit(round, global, aggregate, results, failures) -> the next global weights
    configure_evaluate(round, workers)           -> which workers evaluate (federated eval)
    aggregate_evaluate(round, results)           -> combined evaluation metrics

Updates are combined *as they stream in*, so the coordinator holds O(model size) memory
however many workers report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedcore.errors import ConfigError
from fedcore.plan import TrainConfig
from fedcore.weights import Weights

__all__ = [
    "EvaluateResult",
    "Failure",
    "FedAvg",
    "FitInstruction",
    "FitResult",
    "Strategy",
    "UpdateAggregator",
    "WeightedMeanAggregator",
    "WorkerInfo",
    "weighted_metrics",
]


@dataclass(frozen=True)
class WorkerInfo:
    """What the coordinator knows of a connected worker."""

    worker_id: str
    name: str
    num_examples: int
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class FitInstruction:
    """Ask ``worker`` to train with ``config``."""

    worker: WorkerInfo
    config: TrainConfig


@dataclass(frozen=True)
class FitResult:
    """A valid training result (its update has already gone to the aggregator)."""

    worker: WorkerInfo
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateResult:
    """A worker's evaluation of the global model on its local data."""

    worker: WorkerInfo
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A worker that was asked to take part and did not deliver, and why."""

    worker: WorkerInfo
    reason: str


class UpdateAggregator(ABC):
    """Combines validated updates one at a time; sees each update once."""

    @abstractmethod
    def add(self, update: Weights, num_examples: int) -> None:
        """Fold in one update (full weights). May modify ``update`` in place."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many updates were folded in."""

    @abstractmethod
    def result(self) -> Weights:
        """The combined weights. Call once, after the last ``add``."""


class WeightedMeanAggregator(UpdateAggregator):
    """Running weighted sum of updates (weights = example counts), divided at the end.

    The first update's buffer becomes the accumulator, so the only memory beyond the update
    being received is one model-sized sum. Floating tensors accumulate in their own dtype;
    integer tensors (such as BatchNorm's batch counters) in float64 and are rounded back.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype[np.generic]] = {}
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def add(self, update: Weights, num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError("an update must carry a positive example count")
        w = float(num_examples)
        for name, array in update.items():
            is_float = array.dtype.kind == "f"
            if is_float and array.flags.writeable:
                scaled = np.multiply(array, w, out=array)  # in place: the buffer is ours
            else:
                scaled = np.array(array, dtype=array.dtype if is_float else np.float64)
                scaled *= w
            total = self._sum.get(name)
            if total is None:
                self._dtypes[name] = array.dtype
                self._sum[name] = scaled
            else:
                np.add(total, scaled, out=total)
        self._total_weight += w
        self._count += 1

    def result(self) -> Weights:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        out: Weights = {}
        for name, total in self._sum.items():
            dtype = self._dtypes[name]
            np.divide(total, self._total_weight, out=total)
            out[name] = total if total.dtype == dtype else np.rint(total).astype(dtype)
        return out


def weighted_metrics(results: Sequence[FitResult | EvaluateResult]) -> dict[str, float]:
    """Example-weighted mean of every metric that all results report."""
    if not results:
        return {}
    keys = set(results[0].metrics)
    for r in results[1:]:
        keys &= set(r.metrics)
    total = sum(r.num_examples for r in results)
    if total == 0:
        return {}
    return {k: sum(r.metrics[k] * r.num_examples for r in results) / total for k in sorted(keys)}


class Strategy(ABC):
    """Base class of every strategy; subclass it and override the hooks you need."""

    #: Strategies that must see individual updates (robust rules) set this to True; they
    #: cannot be combined with secure aggregation.
    needs_individual_updates: bool = False

    def configure_fit(
        self, round_number: int, workers: Sequence[WorkerInfo], config: TrainConfig
    ) -> list[FitInstruction]:
        """Choose the workers of this round and their settings. Default: all, same config."""
        return [
            FitInstruction(w, replace(config, seed=config.seed + round_number)) for w in workers
        ]

    @abstractmethod
    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        """A fresh streaming aggregator for one round."""

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Sequence[FitResult],
        failures: Sequence[Failure],
    ) -> Weights:
        """Turn the round's aggregate into the next global weights. Default: take it."""
        return aggregate

    def configure_evaluate(
        self, round_number: int, workers: Sequence[WorkerInfo]
    ) -> list[WorkerInfo]:
        """Choose the workers that evaluate the global model. Default: all."""
        return list(workers)

    def aggregate_evaluate(
        self, round_number: int, results: Sequence[EvaluateResult]
    ) -> dict[str, float]:
        """Combine evaluation metrics. Default: example-weighted mean."""
        return weighted_metrics(results)


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al., AISTATS 2017): the example-weighted mean of the
    workers' weights becomes the new global model."""

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return WeightedMeanAggregator()


_BUILTIN: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def strategy_by_name(name: str) -> Strategy:
    """A built-in strategy with default options."""
    try:
        return _BUILTIN[name.lower()]()
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r}; built-in strategies: {', '.join(sorted(_BUILTIN))}"
        ) from None
