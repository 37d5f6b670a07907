"""Asynchronous rounds for strategies with ``async_settings`` (FedBuff, Nguyen et al. 2022).

Every free worker is given the newest global model at once; its result is folded into the
strategy's aggregator the moment it arrives, rebased onto the current global model and
tagged with its staleness (global updates since the model it trained from). As soon as the
aggregator holds ``buffer_size`` results the strategy turns them into the next global model.
Results older than ``max_staleness`` are dropped. A "round" is one global update: the
coordinator stops after ``--rounds`` of them, and writes one metrics line for each.

It reuses the synchronous machinery: tickets and the upload path of the inbox (through a
:class:`~.rounds.FitCollector` subclass), weight encoding and task issuing of the
coordinator, and its reporting. Federated evaluation does not run in this mode (workers are
never idle); use ``--eval-data``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fedcore.errors import ConfigError, RoundFailedError
from fedcore.strategy import AsyncSettings, Failure, FitResult, UpdateAggregator, weighted_metrics
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from .payloads import WeightsPayload
from .registry import Ticket
from .reporting import MetricsWriter, RoundMetrics
from .rounds import FitCollector

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["AsyncRounds"]

log = logging.getLogger("fedcore.server")

_STALE = "stale"  # a ticket resolved with this carried a result past the maximum staleness


class BufferCollector(FitCollector):
    """Takes results trained from any model version into the current buffer."""

    def __init__(self, rounds: AsyncRounds, aggregator: UpdateAggregator) -> None:
        super().__init__(0, aggregator, rounds.coordinator.weights)
        self.rounds = rounds

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights) -> None:
        async with self._lock:
            if self.closed or ticket.stale or ticket.future.done():
                log.info("discarding a late update from %r", ticket.session.name)
                return
            rounds = self.rounds
            base_version = ticket.round_number - 1
            staleness = rounds.version - base_version
            if staleness > rounds.settings.max_staleness:
                log.info(
                    "dropping an update from %r: staleness %d > %d",
                    ticket.session.name,
                    staleness,
                    rounds.settings.max_staleness,
                )
                ticket.resolve(_STALE)
                return
            current = rounds.coordinator.weights
            base = (
                None if result.update_kind == pb.UPDATE_KIND_DELTA else rounds.bases[base_version]
            )
            await asyncio.to_thread(
                _rebase, update, current, base, self.aggregator, int(result.num_examples), staleness
            )
            self.results.append(
                FitResult(
                    ticket.session.info,
                    int(result.num_examples),
                    dict(result.metrics),
                    staleness=staleness,
                )
            )
            # Apply before resolving: the loop hands this worker its next task as soon as
            # the ticket resolves, and that task must carry the new model.
            if self.aggregator.count >= rounds.settings.buffer_size:
                await rounds.apply()
            ticket.resolve(True)


def _rebase(
    update: Weights,
    current: Weights,
    base: Weights | None,
    aggregator: UpdateAggregator,
    num_examples: int,
    staleness: int,
) -> None:
    """Express ``update`` against ``current`` and fold it in: a delta (``base`` None) becomes
    ``current + delta``; weights trained from an older ``base`` become
    ``current + (weights - base)``."""
    for name, array in update.items():
        now: np.ndarray = current[name]
        if base is None:
            np.add(array, now, out=array, casting="unsafe")
        elif base[name] is not now:
            old: np.ndarray = base[name]
            np.add(array, now - old, out=array, casting="unsafe")
    aggregator.add(update, num_examples, staleness=staleness)


class AsyncRounds:
    """Runs the federation asynchronously until ``config.rounds`` global updates are made."""

    def __init__(
        self, coordinator: Coordinator, writer: MetricsWriter, settings: AsyncSettings
    ) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self.writer = writer
        self.version = 0  # global updates made so far
        self.bases: dict[int, Weights] = {0: coordinator.weights}
        strategy = coordinator.strategy
        self.collector = BufferCollector(self, strategy.start_aggregation(1, coordinator.weights))
        self.in_flight: dict[Ticket, float] = {}  # ticket -> deadline
        self.failures: list[Failure] = []
        self.dropped = 0
        # worker id -> the model version whose plan its policy refused: not asked again
        # until the global model changes (a refusal would otherwise come straight back).
        self.refused_at: dict[str, int] = {}
        self._encoded: tuple[int, WeightsPayload] | None = None
        self._report: asyncio.Task[None] | None = None
        self._update_started = time.perf_counter()
        counters = coordinator.service.counters
        self._bytes = (counters.bytes_sent, counters.bytes_received)

    @property
    def finished(self) -> bool:
        c = self.coordinator
        return self.version >= c.config.rounds or c._end_requested

    async def run(self) -> None:
        c = self.coordinator
        patience = c.config.round_timeout * (c.config.round_retries + 1)
        last_progress = time.perf_counter()
        try:
            while not self.finished:
                seen = c.registry.changes
                self._dispatch_idle()
                waiter = asyncio.create_task(c.registry.wait_for_change(seen))
                now = time.perf_counter()
                next_deadline = min(self.in_flight.values(), default=now + patience)
                try:
                    await asyncio.wait(
                        [waiter, *(cast(asyncio.Future[Any], t.future) for t in self.in_flight)],
                        timeout=max(0.0, next_deadline - now),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                if self._settle():
                    last_progress = time.perf_counter()
                elif time.perf_counter() - last_progress > patience:
                    raise RoundFailedError(
                        f"no worker delivered a result for {patience:g} s (update "
                        f"{self.version + 1}); start more workers or raise --round-timeout"
                    )
        finally:
            self.collector.closed = True
            for ticket in self.in_flight:
                ticket.stale = True
            if self._report is not None:
                await self._report

    def _dispatch_idle(self) -> None:
        c = self.coordinator
        idle = {
            s.worker_id: s
            for s in c.registry.idle()
            if self.refused_at.get(s.worker_id) != self.version
        }
        if not idle:
            return
        instructions = c.strategy.configure_fit(
            self.version + 1, [s.info for s in idle.values()], c.config.train
        )
        if self._encoded is None or self._encoded[0] != self.version:
            self._encoded = (self.version, WeightsPayload(c.weights, c.config.chunk_bytes))
        payload = self._encoded[1]
        model = c.config.model.to_proto()
        deadline = time.perf_counter() + c.config.round_timeout
        for instruction in instructions:
            session = idle.get(instruction.worker.worker_id)
            if session is None:
                raise ConfigError(
                    f"strategy selected unknown or busy worker {instruction.worker.name!r}"
                )
            task = pb.Task(
                round=self.version + 1,
                kind=pb.TASK_KIND_FIT,
                model=model,
                plan=c.config.plan,
                train=instruction.config.to_proto(),
                weights=payload.header,
            )
            c._issue(session, self.collector, task, payload)
            self.in_flight[self.collector.tickets[-1]] = deadline
        self.bases[self.version] = c.weights
        self.collector.tickets.clear()  # tracked in in_flight instead

    def _settle(self) -> bool:
        """Retire answered and overdue tickets; True when some worker answered."""
        now = time.perf_counter()
        answered = False
        for ticket, deadline in list(self.in_flight.items()):
            if ticket.future.done():
                outcome = ticket.future.result()
                if outcome is True:
                    answered = True
                elif outcome == _STALE:
                    answered = True
                    self.dropped += 1
                elif isinstance(outcome, BaseException):
                    self.failures.append(Failure(ticket.session.info, str(outcome)))
            elif now >= deadline:
                ticket.stale = True
                self.collector.fail(ticket, "no result within the round timeout")
            else:
                continue
            del self.in_flight[ticket]
        for failure in self.collector.failures:
            if failure.refused:
                self.refused_at[failure.worker.worker_id] = self.version
        self.failures.extend(self.collector.failures)
        self.collector.failures.clear()
        # Keep only the model versions some worker is still training from.
        live = {t.round_number - 1 for t in self.in_flight} | {self.version}
        self.bases = {v: w for v, w in self.bases.items() if v in live}
        return answered

    async def apply(self) -> None:
        """Turn the full buffer into the next global model (called under the collector's
        lock, so no result is folded in meanwhile)."""
        c = self.coordinator
        results = self.collector.results
        aggregate = await asyncio.to_thread(self.collector.aggregator.result)
        self.version += 1
        c.weights = c.strategy.aggregate_fit(
            self.version, c.weights, aggregate, results, self.failures
        )
        applied = time.perf_counter()
        staleness = [r.staleness for r in results]
        counters = c.service.counters
        metrics = RoundMetrics(
            plan=c.config.plan.hash if c.config.plan is not None else None,
            round=self.version,
            workers=len(results),
            failures=len(self.failures),
            duration_s=0.0,
            bytes_sent=counters.bytes_sent - self._bytes[0],
            bytes_received=counters.bytes_received - self._bytes[1],
            train=weighted_metrics(results),
            refused={f.worker.name: f.reason for f in self.failures if f.refused},
            staleness={
                "mean": round(float(np.mean(staleness)), 3),
                "max": float(max(staleness)),
                "dropped": float(self.dropped),
            },
        )
        log.info(
            "update %d: %d result(s), staleness mean %.2f max %d",
            self.version,
            len(results),
            metrics.staleness["mean"] if metrics.staleness else 0.0,
            max(staleness),
        )
        self._bytes = (counters.bytes_sent, counters.bytes_received)
        self._chain_report(metrics, c.weights, self._update_started, applied)
        self._update_started = applied
        self.failures, self.dropped = [], 0
        self.collector.results = []
        self.collector.aggregator = c.strategy.start_aggregation(self.version + 1, c.weights)
        self.collector.global_weights = c.weights
        self.bases[self.version] = c.weights
        if self.finished:
            self.collector.closed = True

    def _chain_report(
        self, metrics: RoundMetrics, weights: Weights, started: float, applied: float
    ) -> None:
        """Evaluate and write one update's metrics after the previous update's."""
        previous = self._report

        async def report() -> None:
            if previous is not None:
                await previous
            await self.coordinator._report(self.writer, metrics, weights, started, applied)

        self._report = asyncio.create_task(report())
