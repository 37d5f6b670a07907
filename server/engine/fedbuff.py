"""Asynchronous rounds for strategies with ``async_settings`` (FedBuff, Nguyen et al. 2022).

Every free worker is given the newest global model at once; its result is folded into the
strategy's aggregator the moment it arrives, rebased onto the current global model and
tagged with its staleness (global updates since the model it trained from). As soon as the
aggregator holds ``buffer_size`` results the engine turns them into the next global model;
results arriving meanwhile wait for the new buffer. Results older than ``max_staleness`` are
dropped. A "round" is one global update: the federation stops after ``--rounds`` of them, and
writes one metrics line for each.

Uploads take no upload slot: each is spooled to an unlinked temporary file as its chunks
arrive, every chunk checked (in place, finite; :mod:`fedcore.strategy.spool`), so any number
of uploads proceed at once, a straggler's slow upload included, with O(chunk) memory each and
one model on disk per upload in flight. A complete upload is read back and folded under the
collector's lock, one at a time, exactly as a staged update would be: rebased onto the global
model current at that moment, weighted by its staleness then. An upload cut off or refused
part-way only deletes its spool: nothing of it was folded.

A worker whose data owner has not approved the plan yet is not a failure: it is asked again,
backing off, until it trains, while the other workers go on. Once its owner denies the plan
(even after approving it), or ``--approval-timeout`` passes without a decision, it is left out
of the federation (:class:`~.approvals.ApprovalWaits`).

With ``--checkpoint-dir`` (every job on a standing network) each global update is checkpointed
as a synchronous round is (:meth:`~.reports.ReportPipeline.make_durable`): the new model,
the update counter, the strategy's state and the metrics rows are on disk before that model
leaves for any worker. A restarted coordinator goes on from the last checkpointed update;
results that were in flight when it stopped are lost with its process (their workers trained
from a model version the new process never issued, and reconnect as new sessions), so no
update is applied twice and none is skipped. Their workers' own privacy charges stand: a
DP-SGD silo's epsilon comes from its own accountant, and each row carries the largest every
silo has reported so far, across restarts (the rows are in the checkpoint).

Federated evaluation does not run in this mode (workers are never idle); use ``--eval-data``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from fedcore.errors import PayloadError, ProtocolError, RoundFailedError
from fedcore.strategy import AsyncSettings, Failure, FitResult, UpdateAggregator, weighted_metrics
from fedcore.strategy.spool import SpooledUpdate
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights

from ..reporting.metrics import RoundMetrics
from ..state.privacy import privacy_metrics, public_train_metrics
from ..state.registry import Ticket, UploadSink
from ..transport.payloads import WeightsPayload
from ..transport.upload_stream import StreamedUpload, layout_of
from .approvals import ApprovalWaits
from .collectors import FitCollector
from .context import RoundContext

__all__ = ["FedBuffEngine"]

log = logging.getLogger("fedcore.server")

_STALE = "stale"  # a ticket resolved with this carried a result past the maximum staleness


class BufferCollector(FitCollector):
    """Takes results trained from any model version into the current buffer.

    It only folds results in: when the buffer is full it closes (``full`` is set) until the
    engine has made the next global model and :meth:`refill` s it.
    """

    def __init__(self, engine: FedBuffEngine, aggregator: UpdateAggregator) -> None:
        super().__init__(0, aggregator, engine.context.weights)
        self.engine = engine
        self.full = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()

    def refill(self, aggregator: UpdateAggregator, global_weights: Weights) -> None:
        """Start the next buffer against the new global model."""
        self.aggregator = aggregator
        self.global_weights = global_weights
        self.results = []
        self.full.clear()
        self._open.set()

    def shut(self) -> None:
        """Take no more results (the federation is over)."""
        self.closed = True
        self._open.set()  # results waiting for a buffer are discarded

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Fold a result staged whole (kept for callers that hold one; uploads stream)."""
        if update is None:
            raise ProtocolError("a training result must carry an update")
        await self._fold(ticket, result, lambda: update)

    def open_stream(
        self, ticket: Ticket, result: pb.TaskResult, signature: ModelSignature
    ) -> UploadSink | None:
        """Spool this upload to disk as its chunks arrive, each checked (finite, in shape);
        it takes no upload slot. It is folded once complete (:meth:`finish_stream`)."""
        return StreamedUpload(
            signature,
            total_bytes=result.update.total_bytes,
            chunk_bytes=result.update.chunk_bytes,
            stream=SpooledUpdate(layout_of(signature)),
            # Weights or delta is settled by the rebase at fold time, as for a staged update.
            base=None,
            what=f"update from worker {ticket.session.name!r}",
        )

    async def finish_stream(self, ticket: Ticket, result: pb.TaskResult, sink: UploadSink) -> None:
        """Fold a complete spooled upload as :meth:`accept` folds a staged one, then delete
        its spool (dropped unread when it is late or too stale)."""
        assert isinstance(sink, StreamedUpload)
        spool = sink.stream
        assert isinstance(spool, SpooledUpdate)
        try:
            try:
                kept = spool.commit()
            except PayloadError as exc:
                self.fail(ticket, str(exc))
                raise
            if not kept:  # taken back meanwhile: its round ended
                log.info("discarding a late update from %r", ticket.session.name)
                return
            await self._fold(ticket, result, spool.weights)
        finally:
            spool.close()

    async def _fold(
        self, ticket: Ticket, result: pb.TaskResult, read: Callable[[], Weights]
    ) -> None:
        """Fold the update ``read`` returns (called at most once, off the event loop) into
        the buffer, rebased onto the global model current now, weighted by its staleness
        now; a full buffer waits for the engine's next model first."""
        async with self.lock:
            # A full buffer waits for the engine's next model (the lock keeps the others out).
            await self._open.wait()
            if self.closed or ticket.stale or ticket.future.done():
                log.info("discarding a late update from %r", ticket.session.name)
                return
            engine = self.engine
            base_version = ticket.round_number - 1
            staleness = engine.version - base_version
            if staleness > engine.settings.max_staleness:
                log.info(
                    "dropping an update from %r: staleness %d > %d",
                    ticket.session.name,
                    staleness,
                    engine.settings.max_staleness,
                )
                ticket.resolve(_STALE)
                return
            base = (
                None if result.update_kind == pb.UPDATE_KIND_DELTA else engine.bases[base_version]
            )
            current, aggregator = self.global_weights, self.aggregator
            examples = int(result.num_examples)

            def read_and_rebase() -> None:
                _rebase(read(), current, base, aggregator, examples, staleness)

            try:
                await asyncio.to_thread(read_and_rebase)
            except PayloadError as exc:
                # Out of the exact sum's range: the buffer is untouched, the worker failed.
                self.fail(ticket, str(exc))
                raise
            self.results.append(
                FitResult(ticket.session.info, examples, dict(result.metrics), staleness=staleness)
            )
            if self.aggregator.count >= engine.settings.buffer_size:
                # Closed before resolving: the engine makes the next model before it hands
                # this worker its next task, and no result lands in a full buffer.
                self._open.clear()
                self.full.set()
            ticket.resolve(True)


async def _until_set(event: asyncio.Event) -> None:
    await event.wait()


async def _any_done(tickets: list[Ticket]) -> None:
    await asyncio.wait([t.future for t in tickets], return_when=asyncio.FIRST_COMPLETED)


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


class FedBuffEngine:
    """Runs the federation asynchronously until ``config.rounds`` global updates are made,
    from the ``context.rounds_completed`` already made (a resumed checkpoint's)."""

    def __init__(self, context: RoundContext, settings: AsyncSettings) -> None:
        self.context = context
        self.settings = settings
        self.version = context.rounds_completed  # global updates made so far
        self.bases: dict[int, Weights] = {self.version: context.weights}
        self.collector = BufferCollector(
            self, context.strategy.start_aggregation(self.version + 1, context.weights)
        )
        self.in_flight: dict[Ticket, float] = {}  # ticket -> deadline
        self.failures: list[Failure] = []
        self.dropped = 0
        # worker id -> the model version whose plan its policy refused: not asked again
        # until the global model changes (a refusal would otherwise come straight back).
        self.refused_at: dict[str, int] = {}
        self.approvals = ApprovalWaits(
            context.config.limits.approval_timeout, context.config.limits.approval_poll
        )
        self._encoded: tuple[int, WeightsPayload] | None = None
        self._update_started = time.perf_counter()
        counters = context.counters
        self._bytes = (counters.bytes_sent, counters.bytes_received)
        # DP-SGD silos' (epsilon, delta) as last reported, restored rows' included: a silo's
        # spend only grows, so a row never shows less than an earlier one (or a restart) did.
        rows = context.reports.rows
        restored = rows[-1].privacy if rows and rows[-1].privacy else {}
        self.silos: dict[str, dict[str, float]] = dict(restored.get("silos", {}))

    @property
    def finished(self) -> bool:
        return self.version >= self.context.config.rounds or self.context.end_requested

    async def run(self) -> None:
        ctx = self.context
        ctx.collector = self.collector
        patience = ctx.config.limits.round_timeout * (ctx.config.limits.round_retries + 1)
        last_progress = time.perf_counter()
        try:
            while not self.finished:
                ctx.round = self.version + 1
                seen = ctx.registry.changes
                self._dispatch_idle()
                now = time.perf_counter()
                ask = self.approvals.next_ask(now)
                next_deadline = min(
                    [*self.in_flight.values(), now + patience if ask is None else ask]
                )
                wakers = [
                    asyncio.create_task(ctx.registry.wait_for_change(seen)),
                    asyncio.create_task(_until_set(self.collector.full)),
                ]
                if self.in_flight:
                    wakers.append(asyncio.create_task(_any_done(list(self.in_flight))))
                try:
                    await asyncio.wait(
                        wakers,
                        timeout=max(0.0, next_deadline - now),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for waker in wakers:
                        waker.cancel()
                if self._settle() or self.approvals.deadline() is not None:
                    # An owner still deciding is no stall: its wait is bounded by its own
                    # timeout, after which it is left out.
                    last_progress = time.perf_counter()
                elif time.perf_counter() - last_progress > patience:
                    raise RoundFailedError(
                        f"no worker delivered a result for {patience:g} s (update "
                        f"{self.version + 1}); start more workers or raise --round-timeout"
                    )
                if self.collector.full.is_set():
                    await self._apply()
        finally:
            self.collector.shut()
            for ticket in self.in_flight:
                ticket.stale = True
            await ctx.reports.drain()

    def _dispatch_idle(self) -> None:
        ctx = self.context
        now = time.perf_counter()
        idle = {
            s.worker_id: s
            for s in ctx.registry.idle()
            if self.refused_at.get(s.worker_id) != self.version
            and self.approvals.may_ask(s.worker_id, now)
        }
        if not idle:
            return
        instructions = ctx.strategy.configure_fit(
            self.version + 1, [s.info for s in idle.values()], ctx.config.train
        )
        if self._encoded is None or self._encoded[0] != self.version:
            self._encoded = (self.version, ctx.payload())
        payload = self._encoded[1]
        deadline = time.perf_counter() + ctx.config.limits.round_timeout
        selected = ctx.select([i.worker for i in instructions], idle)
        for instruction, session in zip(instructions, selected, strict=True):
            task = ctx.fit_task(self.version + 1, instruction, payload)
            self.in_flight[ctx.issue(session, self.collector, task, payload)] = deadline
        self.bases[self.version] = ctx.weights

    def _settle(self) -> bool:
        """Retire answered and overdue tickets; True when some worker answered."""
        now = time.perf_counter()
        answered = False
        for ticket, deadline in list(self.in_flight.items()):
            if ticket.future.done():
                outcome = ticket.future.result()
                if outcome is True:
                    answered = True
                    self.approvals.settled(ticket.session.worker_id)
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
            if failure.awaiting:
                self._awaiting(failure, now)
            else:
                if failure.refused and not self._left_out(failure):
                    self.refused_at[failure.worker.worker_id] = self.version
                self.failures.append(failure)
        self.collector.failures.clear()
        ctx = self.context
        self.approvals.keep_only({s.worker_id for s in ctx.registry.sessions()})
        ctx.awaiting(self.approvals.names(), len(ctx.registry.sessions()))
        # Keep only the model versions some worker is still training from.
        live = {t.round_number - 1 for t in self.in_flight} | {self.version}
        self.bases = {v: w for v, w in self.bases.items() if v in live}
        return answered

    def _awaiting(self, failure: Failure, now: float) -> None:
        """A worker's owner has not decided on the plan yet: ask it again later, or leave it
        out once ``--approval-timeout`` has passed."""
        worker = failure.worker
        retry_in = self.approvals.awaiting(worker.worker_id, worker.name, now)
        if retry_in is None:
            reason = self.approvals.left_out[worker.worker_id]
            self.failures.append(replace(failure, reason=reason, awaiting=False))
            self._log_left_out(worker.name, reason)
            return
        log.info(
            "update %d: the data owner of %r has not decided on the plan; asking again in "
            "%.0f s (fed-worker requests approve)",
            self.version + 1,
            worker.name,
            retry_in,
            extra={
                "event": "awaiting_approval",
                "round": self.version + 1,
                "worker": worker.name,
                "retry_in": round(retry_in, 1),
            },
        )

    def _left_out(self, failure: Failure) -> bool:
        """True when ``failure`` (a refusal) denies a plan its owner was deciding on: the
        worker takes no further part."""
        if not self.approvals.refused(failure.worker.worker_id, failure.reason):
            return False
        self._log_left_out(failure.worker.name, failure.reason)
        return True

    def _log_left_out(self, name: str, reason: str) -> None:
        log.warning(
            "leaving %r out of the federation: %s",
            name,
            reason,
            extra={"event": "worker_left_out", "worker": name, "reason": reason},
        )

    async def _apply(self) -> None:
        """Turn the full buffer into the next global model and open the next buffer."""
        ctx = self.context
        collector = self.collector
        results = collector.results
        aggregate = await asyncio.to_thread(collector.aggregator.result)
        self.version += 1
        weights = ctx.apply(self.version, aggregate, results, self.failures)
        applied = time.perf_counter()
        staleness = [r.staleness for r in results]
        counters = ctx.counters
        metrics = RoundMetrics(
            plan=ctx.config.plan.hash if ctx.config.plan is not None else None,
            round=self.version,
            workers=len(results),
            failures=len(self.failures),
            duration_s=0.0,
            bytes_sent=counters.bytes_sent - self._bytes[0],
            bytes_received=counters.bytes_received - self._bytes[1],
            train=weighted_metrics(public_train_metrics(results)),
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
        metrics.privacy = self._privacy(results)
        # The update's model leaves (the next tasks) only once its checkpoint is on disk.
        await ctx.reports.make_durable(metrics, ctx.model_weights(weights))
        ctx.reports.submit(metrics, ctx.model_weights(weights), self._update_started, applied)
        self._update_started = applied
        self.failures, self.dropped = [], 0
        self.bases[self.version] = weights
        if self.finished:
            collector.shut()
        else:
            collector.refill(ctx.strategy.start_aggregation(self.version + 1, weights), weights)

    def _privacy(self, results: list[FitResult]) -> dict[str, Any] | None:
        """The update's privacy line: every DP-SGD silo's largest reported (epsilon, delta)
        so far, this update's results included."""
        reported = privacy_metrics(self.context.strategy, results) or {}
        for name, spent in reported.get("silos", {}).items():
            known = self.silos.get(name)
            if known is None or spent["epsilon"] >= known["epsilon"]:
                self.silos[name] = dict(spent)
        if self.silos:
            reported["silos"] = dict(sorted(self.silos.items()))
        return reported or None
