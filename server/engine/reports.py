"""The report pipeline: evaluate, record and checkpoint each completed round, in order, while
the next round trains.

A round engine :meth:`~ReportPipeline.submit` s a round as soon as its model is made; the
pipeline evaluates that model on ``--eval-data`` in a thread, fills in the round's timings,
hands the row to every sink, asks the strategy's ``on_round_end`` whether to stop, and writes
the checkpoint. Reports run one after another in submission order. The pipeline is the only
owner of the pending reports: engines wait for them with :meth:`~ReportPipeline.drain`.

No epsilon is lost to a crash: with ``--checkpoint-dir`` an engine calls
:meth:`~ReportPipeline.make_durable` as soon as a round's model is made, *before* that model
leaves the coordinator (the next round's plans, federated evaluation, ``--save-model``): the
checkpoint, with the strategy's state and so the privacy accountant's, is then on disk
(fsync and atomic rename). The report rewrites it with the round's evaluation.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Sequence

from fedcore.strategy import Strategy
from fedcore.weights import Weights

from ..reporting.metrics import RoundMetrics
from ..reporting.sink import Sink
from ..state.checkpoint import Checkpointer
from .evaluation import CentralEvaluator

__all__ = ["ReportPipeline", "peak_rss_bytes"]

log = logging.getLogger("fedcore.server")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ReportPipeline:
    """Reports completed rounds one after another, off the round loop.

    Args:
        strategy: asked ``on_round_end`` after each round's report.
        evaluator: centralized evaluation (``--eval-data``), or None.
        sinks: where each round's row goes (the JSONL file, displays, exporters).
        checkpointer: writes a checkpoint after each round (``--checkpoint-dir``), or None.
        restored: rows of the rounds a resumed federation already ran.
    """

    def __init__(
        self,
        strategy: Strategy,
        evaluator: CentralEvaluator | None,
        sinks: Sequence[Sink],
        checkpointer: Checkpointer | None = None,
        restored: Sequence[RoundMetrics] = (),
    ) -> None:
        self._strategy = strategy
        self._evaluator = evaluator
        self._sinks = sinks
        self._checkpointer = checkpointer
        #: Every reported round, restored ones first.
        self.rows: list[RoundMetrics] = list(restored)
        #: Set when the strategy's ``on_round_end`` asked to end the federation.
        self.end_requested = False
        #: ``perf_counter()`` when round 1 (or the first resumed round) began (0 before).
        self.started = 0.0
        # Training time of the runs before a --resume: elapsed_s goes on from there.
        self._elapsed_before = self.rows[-1].elapsed_s if self.rows else 0.0
        #: The model of the last checkpoint on disk (None: none yet).
        self.durable: Weights | None = None
        self._last: asyncio.Task[None] | None = None

    def start_clock(self) -> None:
        """Round 1 begins now (elapsed times count from here)."""
        self.started = time.perf_counter()

    def elapsed_s(self, now: float) -> float:
        """Training wall clock at ``now`` (a ``perf_counter()``), across --resume."""
        return self._elapsed_before + now - self.started

    def submit(
        self,
        metrics: RoundMetrics,
        weights: Weights,
        started: float,
        fit_done: float | None = None,
    ) -> None:
        """Report a round whose model is ``weights`` (training began at ``started`` and ended
        at ``fit_done``, default now), after every round submitted before it."""
        if fit_done is None:
            fit_done = time.perf_counter()
        # Taken now: the next round's configure_fit may change the strategy's state.
        states = self._checkpointer.snapshot() if self._checkpointer is not None else None
        previous = self._last
        self._last = asyncio.create_task(
            self._report(previous, metrics, weights, started, fit_done, states)
        )

    async def make_durable(self, metrics: RoundMetrics, weights: Weights) -> None:
        """Checkpoint the round of ``metrics`` (model ``weights``, the strategy's state now)
        before its model may leave the coordinator; nothing without ``--checkpoint-dir``."""
        if self._checkpointer is None:
            return
        await self.drain()  # the rows of the rounds before it
        states = self._checkpointer.snapshot()
        rows = [r.to_json() for r in [*self.rows, metrics]]
        await self._checkpointer.save(metrics.round, weights, states, rows)
        self.durable = weights

    def exportable(self, weights: Weights) -> Weights:
        """What may leave as the final model: ``weights``, or with checkpoints on, the last
        checkpoint's model (a stop between a round's aggregation and its checkpoint exports
        the round before)."""
        if self._checkpointer is None or self.durable is None:
            return weights
        return self.durable

    async def drain(self) -> None:
        """Wait until every submitted round is reported (re-raises a report's failure)."""
        if self._last is not None:
            await self._last

    async def drain_for(self, timeout: float) -> None:
        """Give the pending reports at most ``timeout`` seconds (when stopping early)."""
        if self._last is not None and not self._last.done():
            await asyncio.wait({self._last}, timeout=timeout)

    async def _report(
        self,
        previous: asyncio.Task[None] | None,
        metrics: RoundMetrics,
        weights: Weights,
        started: float,
        fit_done: float,
        states: dict[str, dict[str, object]] | None,
    ) -> None:
        if previous is not None:
            await previous
        eval_started = time.perf_counter()
        if self._evaluator is not None:
            try:
                result = await asyncio.to_thread(self._evaluator.evaluate, weights)
            except Exception as exc:  # the trained round stands; only its evaluation is lost
                log.error(
                    "round %d: centralized evaluation failed (%s: %s); the round's model is "
                    "kept, without accuracy",
                    metrics.round,
                    type(exc).__name__,
                    exc,
                )
            else:
                metrics.accuracy, metrics.loss = result.accuracy, result.loss
        # Evaluation overlaps the next round's training; a round's duration counts its own
        # training and its own evaluation, not the overlap.
        metrics.fit_s = round(fit_done - started, 3)
        metrics.eval_s = round(time.perf_counter() - eval_started, 3)
        metrics.duration_s = round(metrics.fit_s + metrics.eval_s, 3)
        metrics.elapsed_s = round(self.elapsed_s(fit_done), 3)
        metrics.peak_rss_bytes = peak_rss_bytes()
        self.rows.append(metrics)
        log.info(
            "round %d completed: %d result(s), %d failure(s)",
            metrics.round,
            metrics.workers,
            metrics.failures,
            extra={
                "event": "round_completed",
                "round": metrics.round,
                "workers": metrics.workers,
                "failures": metrics.failures,
            },
        )
        for sink in self._sinks:
            sink.round_completed(metrics)
        if self._strategy.on_round_end(metrics.round, weights, metrics.to_json()):
            self.end_requested = True
        if self._checkpointer is not None and states is not None:
            rows = [r.to_json() for r in self.rows]
            await self._checkpointer.save(metrics.round, weights, states, rows)
            self.durable = weights
