"""The strategy API: the records a strategy sees, the streaming aggregator, and the ABC.

A strategy never touches gRPC. The coordinator's round loop calls its hooks::

    configure_fit(round, workers, config)        -> which workers train, and with what config
    start_aggregation(round, global_weights)     -> a streaming UpdateAggregator for the round
        aggregator.add(update, num_examples)     ... once per valid result, as they arrive
    aggregate_fit(round, global, aggregate, results, failures) -> the next global weights
    configure_evaluate(round, workers)           -> which workers evaluate (federated eval)
    aggregate_evaluate(round, results)           -> combined evaluation metrics
    on_round_end(round, weights, metrics)        -> True to end the federation early

and declares its capabilities: ``needs_individual_updates``, ``async_settings`` and
``may_stop_early`` (wrappers such as differential privacy pass them through).

Updates are combined *as they stream in*, so the coordinator holds O(model size) memory
however many workers report, and exactly (:mod:`.accumulate`), so the order in which they
arrive cannot change the result. With secure aggregation the coordinator only learns the
example-weighted mean of the updates, and feeds it to the aggregator as *one* update carrying
the total example count: a strategy that only needs the weighted mean (FedAvg, FedAvgM,
FedProx, the FedOpt family) runs unchanged. A strategy that must see every update (the robust
rules) sets ``needs_individual_updates = True`` and is refused with secure aggregation
(:func:`check_secure_aggregation`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from fedcore.data.metadata import DatasetMetadata
from fedcore.errors import ConfigError
from fedcore.plan import TrainConfig
from fedcore.weights import Weights

from .accumulate import ExactSum
from .fixed_point import FixedPointSum
from .sampling import ClientSampler
from .streaming import UpdateAccess, UpdateStream

__all__ = [
    "AsyncSettings",
    "EvaluateResult",
    "Failure",
    "FitInstruction",
    "FitResult",
    "PieceSink",
    "Strategy",
    "StrategyState",
    "StreamingAggregator",
    "UpdateAggregator",
    "WeightedMeanAggregator",
    "WorkerInfo",
    "check_secure_aggregation",
    "weighted_metrics",
]

#: What ``Strategy.state_dict()`` returns: plain values, numpy arrays, and dicts of them.
StrategyState = dict[str, Any]


@dataclass(frozen=True)
class WorkerInfo:
    """What the coordinator knows of a connected worker."""

    worker_id: str
    name: str
    num_examples: int
    capabilities: tuple[str, ...] = ()
    #: The dataset's public description from the worker's hello, if it sent one.
    dataset: DatasetMetadata | None = None


@dataclass(frozen=True)
class FitInstruction:
    """Ask ``worker`` to train with ``config``."""

    worker: WorkerInfo
    config: TrainConfig


@dataclass(frozen=True)
class FitResult:
    """A valid training result (its update has already gone to the aggregator).

    ``staleness`` counts the global-model updates made since the model this result was
    trained from (always 0 in synchronous rounds).
    """

    worker: WorkerInfo
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    staleness: int = 0


@dataclass(frozen=True)
class EvaluateResult:
    """A worker's evaluation of the global model on its local data."""

    worker: WorkerInfo
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A worker that was asked to take part and did not deliver, and why. ``refused``: the
    worker's data owner policy refused the plan (the reason names the rule). ``answered``: the
    worker itself reported the failure (a refusal, or training that failed), so the same plan
    would fail the same way again; otherwise it dropped out or timed out. ``awaiting``: the
    refusal is the data owner's pending decision on the plan, which a later task may find
    made (the round waits for it)."""

    worker: WorkerInfo
    reason: str
    refused: bool = False
    answered: bool = False
    awaiting: bool = False


class UpdateAggregator(ABC):
    """Combines validated updates one at a time; sees each update once.

    An update is always a full set of weights expressed against the global weights the
    aggregation started from. In asynchronous mode a stale update (trained from an older
    model) arrives *rebased*: ``global + (its weights - the weights it was trained from)``,
    with its ``staleness`` (the number of global updates since that older model).
    """

    @abstractmethod
    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        """Fold in one update. May modify ``update`` in place (the buffer is the
        aggregator's from now on)."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many updates were folded in."""

    @abstractmethod
    def result(self) -> Weights:
        """The combined weights. Call once, after the last ``add``."""


#: A streamed update's tensors: name -> (shape, dtype), in payload order.
Layout = dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]]


class PieceSink(Protocol):
    """One update taken piece by piece (what :meth:`StreamingAggregator.open` returns):
    :class:`~.streaming.UpdateStream` for the weighted sums, a spooled update
    (:mod:`.spool`) for the rules that need every update or the whole norm."""

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        """Take elements ``start..`` of tensor ``name``; False when closed meanwhile."""
        ...

    def commit(self) -> bool:
        """Keep what was folded; False when the stream was aborted first."""
        ...

    def abort(self) -> None:
        """Take back, exactly, everything folded so far."""
        ...


class StreamingAggregator(UpdateAggregator):
    """An aggregator that also takes updates piece by piece (:mod:`.streaming`): what a
    strategy declaring ``update_access = UpdateAccess.STREAM`` returns from
    ``start_aggregation``. The coordinator calls :meth:`expect` once, then for each upload
    :meth:`open`, ``stream.fold(...)`` per checked piece, and :meth:`commit` or
    ``stream.abort()``; :meth:`result` counts committed streams (and whole ``add``-ed
    updates) only."""

    @abstractmethod
    def expect(self, total_weight: float) -> None:
        """The most weight the round's updates may carry together (the example counts the
        round's workers announced, which bound what they may claim); called once, before
        any update."""

    @abstractmethod
    def open(self, layout: Layout, num_examples: int) -> PieceSink:
        """A stream for one update of ``layout`` weighing ``num_examples``."""

    @abstractmethod
    def commit(self, stream: PieceSink, num_examples: int) -> bool:
        """Count a fully folded stream as one update; False when it was aborted first (the
        round closed meanwhile)."""


class WeightedMeanAggregator(StreamingAggregator):
    """Weighted mean of updates (weights = example counts), independent of arrival order.

    With a weight budget (:meth:`expect`, or ``weight_budget=``) updates go into a one-limb
    exact sum (:class:`~.fixed_point.FixedPointSum`) and may stream in piece by piece;
    without one, into the two-limb :class:`~.accumulate.ExactSum`, which needs no budget but
    costs several times more per update. Either way the same updates give the same bytes
    whatever order they arrive in, and the mean is rounded to each tensor's dtype once, at
    the end. Memory: 8 (budgeted) or 16 bytes per parameter, whatever the number of updates.
    Integer tensors (such as BatchNorm's batch counters) are rounded back.
    """

    def __init__(
        self, weight_budget: float | None = None, *, journal_dir: str | None = None
    ) -> None:
        self._fixed = FixedPointSum(weight_budget) if weight_budget is not None else None
        self._exact: ExactSum | None = None
        self._journal_dir = journal_dir
        self._open: set[PieceSink] = set()
        self._dtypes: dict[str, np.dtype[np.generic]] = {}
        self._total_weight = 0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def expect(self, total_weight: float) -> None:
        if self._count or self._open or self._exact is not None:
            raise ValueError("the weight budget must be declared before the first update")
        self._fixed = FixedPointSum(max(float(total_weight), 1.0))

    def add(self, update: Weights, num_examples: int, *, staleness: int = 0) -> None:
        if num_examples <= 0:
            raise ValueError("an update must carry a positive example count")
        if self._fixed is not None:
            with self._fixed.lock:
                self._fixed.add(update, num_examples)
        else:
            if self._exact is None:
                self._exact = ExactSum()
            self._exact.add(update, num_examples)
        self._counted(num_examples, {name: a.dtype for name, a in update.items()})

    def open(self, layout: Layout, num_examples: int) -> UpdateStream:
        if self._fixed is None:
            raise ValueError("a streamed update needs the round's weight budget (expect)")
        if num_examples <= 0:
            raise ValueError("an update must carry a positive example count")
        for name, (shape, dtype) in layout.items():
            self._fixed.declare(name, shape, dtype)
        stream = UpdateStream(self._fixed, num_examples, journal_dir=self._journal_dir)
        self._open.add(stream)
        if not self._dtypes:
            self._dtypes = {name: dtype for name, (_, dtype) in layout.items()}
        return stream

    def commit(self, stream: PieceSink, num_examples: int) -> bool:
        self._open.discard(stream)
        if not stream.commit():
            return False
        self._counted(num_examples, {})
        return True

    def _counted(self, num_examples: int, dtypes: dict[str, np.dtype[np.generic]]) -> None:
        if not self._dtypes:
            self._dtypes = dtypes
        self._total_weight += int(num_examples)
        self._count += 1

    def result(self) -> Weights:
        # A stream still open did not complete in time: it never counted, so it leaves.
        for stream in self._open:
            stream.abort()
        self._open.clear()
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        if self._fixed is not None:
            with self._fixed.lock:
                # The round's last use of its sum: its memory goes as the result is made.
                return self._fixed.total(self._total_weight, self._dtypes, release=True)
        assert self._exact is not None
        return self._exact.total(self._total_weight, self._dtypes)


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
    # fsum is exactly rounded, so the order results arrived in does not change the metrics.
    return {
        k: math.fsum(r.metrics[k] * r.num_examples for r in results) / total for k in sorted(keys)
    }


@dataclass(frozen=True)
class AsyncSettings:
    """Asks the coordinator for asynchronous aggregation (FedBuff, Nguyen et al. 2022).

    Workers then train continuously, each on the newest global model when it becomes free;
    the coordinator applies an update as soon as ``buffer_size`` results are in the
    aggregator, and drops results more than ``max_staleness`` updates old.
    """

    buffer_size: int
    max_staleness: int

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"buffer-size must be at least 1, got {self.buffer_size}")
        if self.max_staleness < 0:
            raise ConfigError(f"max-staleness cannot be negative, got {self.max_staleness}")


class Strategy(ABC):
    """Base class of every strategy; subclass it and override the hooks you need.

    Only :meth:`start_aggregation` is required. Round numbers start at 1; in asynchronous
    mode a "round" is one update of the global model.
    """

    #: Strategies that must see individual updates (robust rules) set this to True; they
    #: cannot be combined with secure aggregation.
    needs_individual_updates: ClassVar[bool] = False

    #: How aggregation takes the round's updates: ``STREAM`` (piece by piece as chunks
    #: arrive, O(model) memory; ``start_aggregation`` then returns a
    #: :class:`StreamingAggregator`) or ``WHOLE`` (each update staged whole; the default,
    #: right for any aggregator). See docs/strategies.md for each built-in's memory.
    update_access: ClassVar[UpdateAccess] = UpdateAccess.WHOLE

    #: Which workers train each round (default: all). Replace it on an instance, e.g.
    #: ``strategy.sampler = ClientSampler(fraction=0.5, min_workers=2, seed=1)``.
    sampler: ClientSampler = ClientSampler()

    @property
    def required_updates(self) -> int:
        """Fewest updates this strategy can aggregate in one round (robust rules need more
        than one); a federation whose rounds may complete with fewer is refused at start."""
        return 1

    @property
    def async_settings(self) -> AsyncSettings | None:
        """Not None to run asynchronously (see :class:`AsyncSettings`). Default: rounds."""
        return None

    @property
    def may_stop_early(self) -> bool:
        """Whether :meth:`on_round_end` may end the federation. True makes the coordinator
        wait for each round's evaluation before it starts the next round, so the decision is
        exact; False (the default) lets evaluation overlap the next round's training. Declare
        it (``may_stop_early = True``) when you override :meth:`on_round_end` to stop."""
        return False

    def configure_fit(
        self, round_number: int, workers: Sequence[WorkerInfo], config: TrainConfig
    ) -> list[FitInstruction]:
        """Choose the workers of this round and their settings (one config per worker).
        Default: the sampler's choice, all with ``config`` and a per-round seed."""
        return [
            FitInstruction(w, replace(config, seed=config.seed + round_number))
            for w in self.sampler.sample(round_number, workers)
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
        """Turn the round's aggregate into the next global weights. Default: take it.

        ``results`` and ``failures`` describe who delivered (with secure aggregation too);
        the updates themselves only ever reach the strategy through its aggregator.
        """
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

    def on_round_end(self, round_number: int, weights: Weights, metrics: Mapping[str, Any]) -> bool:
        """Called once a round's metrics are known (``metrics`` is the ``--metrics-out`` row,
        centralized ``accuracy``/``loss`` included); return True to end the federation now.

        A strategy that stops this way declares :attr:`may_stop_early`; otherwise the next
        round may already have started when it decides.
        """
        return False

    def state_dict(self) -> StrategyState:
        """State that must survive a coordinator restart (momentum buffers, moments,
        counters) as numpy arrays and plain values. Default: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ConfigError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


def check_round_size(strategy: Strategy, *, results_needed: int, flag: str) -> None:
    """Refuse a federation whose rounds may complete with fewer updates than ``strategy``
    can aggregate; ``flag`` names the setting that sets ``results_needed``."""
    needed = strategy.required_updates
    if results_needed < needed:
        raise ConfigError(
            f"strategy {type(strategy).__name__} needs at least {needed} updates per round, "
            f"and rounds would complete with {results_needed} ({flag} {results_needed}); "
            f"pass {flag} {needed} and start at least {needed} workers"
        )


def check_secure_aggregation(strategy: Strategy, *, secure_aggregation: bool) -> None:
    """Refuse a strategy that needs individual updates when only their sum is available."""
    if secure_aggregation and strategy.needs_individual_updates:
        raise ConfigError(
            f"strategy {type(strategy).__name__} needs every worker's individual update, but "
            "secure aggregation only reveals their sum; turn secure aggregation off or pick a "
            "strategy that works on the weighted mean (fedavg, fedavgm, fedprox, fedadagrad, "
            "fedadam, fedyogi)"
        )
