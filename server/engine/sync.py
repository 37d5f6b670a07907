"""Synchronous rounds: the round loop, read top-down.

A round sends each selected worker a plan (a Task whose weights follow as chunks), folds valid
updates into the strategy's aggregator as they arrive, and completes when every worker answered
or the round timeout passed. With fewer than ``--min-results`` results the round is retried (at
most ``--round-retries`` times); the global model only ever changes from a completed round.
A worker whose data owner has not yet approved the plan is not a failure: while the round lacks
results, it is asked again (backing off) until the owner decides or ``--approval-timeout``
passes, and the other results wait with the round (:meth:`SyncEngine._await_approvals`). The
previous round's centralized evaluation (the report pipeline) overlaps the next round's training,
except for a strategy that may end the federation after a round: it sees each round's
evaluation before the next round starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from fedcore.errors import ConfigError, PrivacyBudgetExhausted, RoundFailedError
from fedcore.privacy import ClientDP
from fedcore.strategy import FitInstruction, UpdateAccess, weighted_metrics
from fedcore.v1 import fedcore_pb2 as pb

from ..reporting.metrics import RoundMetrics
from ..state.privacy import privacy_metrics, public_train_metrics
from .approvals import APPROVAL_POLL_FIRST
from .collectors import EvaluateCollector, FitCollector
from .context import RoundContext
from .secagg import SecAggCollector

__all__ = ["SyncEngine"]

log = logging.getLogger("fedcore.server")


class SyncEngine:
    """Runs rounds ``first_round..config.rounds`` one after another."""

    def __init__(self, context: RoundContext) -> None:
        self.context = context
        # The current attempt's instruction per worker id (to ask a worker again).
        self._instructions: dict[str, FitInstruction] = {}

    async def run(self, first_round: int) -> None:
        ctx, cfg = self.context, self.context.config
        reports = ctx.reports
        for round_number in range(first_round, cfg.rounds + 1):
            ctx.round = round_number
            if ctx.strategy.may_stop_early:
                await reports.drain()
            if ctx.end_requested:
                log.info("the strategy ended the federation after round %d", round_number - 1)
                break
            started = time.perf_counter()
            sent0, received0 = ctx.counters.bytes_sent, ctx.counters.bytes_received
            try:
                collector, attempts = await self._fit_with_retries(round_number)
            except PrivacyBudgetExhausted as exc:
                log.warning("privacy budget reached: %s", exc)
                break
            metrics = RoundMetrics(
                plan=cfg.plan.hash if cfg.plan is not None else None,
                round=round_number,
                workers=len(collector.results),
                failures=len(collector.failures),
                duration_s=0.0,
                bytes_sent=0,
                bytes_received=0,
                attempts=attempts,
                train=weighted_metrics(public_train_metrics(collector.results)),
                refused={f.worker.name: f.reason for f in collector.failures if f.refused},
            )
            privacy = privacy_metrics(ctx.strategy, collector.results)
            if privacy is not None:
                metrics.privacy = privacy
                if "epsilon" in privacy:
                    metrics.epsilon, metrics.delta = privacy["epsilon"], privacy["delta"]
            # The round's model leaves (federated evaluation, the next round) only once its
            # checkpoint is on disk: see ReportPipeline.make_durable.
            await reports.make_durable(metrics, ctx.model_weights(ctx.weights))
            every = cfg.output.fed_eval_every
            if every and (round_number % every == 0 or round_number == cfg.rounds):
                metrics.federated = await self._federated_evaluate(round_number)
            metrics.bytes_sent = ctx.counters.bytes_sent - sent0
            metrics.bytes_received = ctx.counters.bytes_received - received0
            reports.submit(metrics, ctx.model_weights(ctx.weights), started)
            # The collector holds the round's starting model: drop it before the next round
            # (a model-sized buffer while the next round runs, memory O(model)).
            del collector
        await reports.drain()

    async def _fit_with_retries(self, round_number: int) -> tuple[FitCollector, int]:
        """One training round, retried while too few valid results arrive."""
        ctx, cfg = self.context, self.context.config
        needed = cfg.results_needed
        approval_deadline = time.monotonic() + cfg.limits.approval_timeout
        attempt = 0
        while attempt <= cfg.limits.round_retries:
            attempt += 1
            if not await ctx.registry.wait_for_idle(needed, cfg.limits.round_timeout):
                log.warning(
                    "round %d: fewer than %d worker%s ready",
                    round_number,
                    needed,
                    "s are" if needed > 1 else " is",
                )
                await ctx.reports.drain()
                continue
            collector = self._dispatch_fit(round_number)
            if collector is None:
                log.warning(
                    "round %d: a worker left before the round started; waiting for %d",
                    round_number,
                    needed,
                )
                continue
            # The previous round's report runs meanwhile: a collector that drives phases
            # itself (secure aggregation) must not wait behind it.
            try:
                await self._collect(collector)
                await self._await_approvals(round_number, collector, approval_deadline)
            finally:
                ctx.route_secagg(None)
            # A strategy that samples fewer workers than --min-results needs all of them.
            needed_now = min(needed, collector.issued)
            for failure in collector.failures:
                if not failure.answered:  # the inbox logged the worker's own answer already
                    log.warning(
                        "round %d: worker %r dropped: %s",
                        round_number,
                        failure.worker.name,
                        failure.reason,
                        extra={
                            "event": "worker_dropped",
                            "round": round_number,
                            "worker": failure.worker.name,
                            "reason": failure.reason,
                        },
                    )
            if len(collector.results) >= needed_now:
                ctx.awaiting([], collector.issued)
                aggregate = collector.aggregator.result()
                ctx.apply(round_number, aggregate, collector.results, collector.failures)
                return collector, attempt
            log.warning(
                "round %d attempt %d: %d valid result(s), %d needed; the global model is unchanged",
                round_number,
                attempt,
                len(collector.results),
                needed_now,
            )
            awaiting = [f.worker.name for f in collector.failures if f.awaiting]
            left = approval_deadline - time.monotonic()
            if awaiting and left > 0 and isinstance(collector, SecAggCollector):
                # A secure round's members are fixed when it starts: run it again once the
                # owners had time to decide (not counted as a retry).
                ctx.awaiting(awaiting, collector.issued)
                log.warning(
                    "round %d: waiting for the data owner of %s to approve the plan",
                    round_number,
                    ", ".join(repr(n) for n in awaiting),
                )
                await asyncio.sleep(min(cfg.limits.approval_poll, left))
                attempt -= 1
                continue
            accounted = len(collector.results) + len(collector.failures) == collector.issued
            if collector.failures and accounted and all(f.answered for f in collector.failures):
                # Every missing worker answered with a failure of this very plan (a refusal,
                # training that diverged): the same plan on the same weights fails again.
                await ctx.reports.drain()
                answers = "; ".join(f"{f.worker.name}: {f.reason}" for f in collector.failures)
                waited = (
                    f"; the plan waited --approval-timeout {cfg.limits.approval_timeout:g} s for "
                    "its data owners' approval"
                    if awaiting
                    else ""
                )
                raise RoundFailedError(
                    f"round {round_number} cannot succeed: {len(collector.results)} valid "
                    f"result(s) of {needed_now} needed, and the other workers reported failures "
                    f"that a retry of the same plan would repeat ({answers}){waited}",
                    answers={f.worker.name: f.reason for f in collector.failures},
                )
        await ctx.reports.drain()
        attempts = cfg.limits.round_retries + 1
        raise RoundFailedError(
            f"round {round_number} failed {attempts} time{'s' if attempts > 1 else ''}: fewer "
            f"than {needed} worker{'s' if needed > 1 else ''} delivered valid results; see the "
            "warnings above"
        )

    async def _await_approvals(
        self, round_number: int, collector: FitCollector, deadline: float
    ) -> None:
        """Ask the workers that answered "awaiting approval" again, backing off, until the
        round has the results it needs, they stop waiting, or ``deadline`` passes.

        The owner approves with ``fed-worker requests approve``, and the plan's next task runs
        (the decision is a file the worker reads at each task). The results already in stay in
        the round's aggregator: the workers that delivered them train nothing again, so no
        privacy is spent twice. A secure round's members are fixed: it is rerun instead."""
        ctx = self.context
        needed = ctx.config.results_needed
        most = ctx.config.limits.approval_poll
        delay = min(APPROVAL_POLL_FIRST, most)
        told = False
        while not isinstance(collector, SecAggCollector):
            awaiting = [f for f in collector.failures if f.awaiting]
            left = deadline - time.monotonic()
            if not awaiting or len(collector.results) >= min(needed, collector.issued) or left <= 0:
                ctx.awaiting([], collector.issued)
                return
            ctx.awaiting([f.worker.name for f in awaiting], collector.issued)
            if not told:
                log.warning(
                    "round %d: waiting up to %.0f s for the data owner of %s to decide on the "
                    "plan (fed-worker requests approve); %d result(s) in",
                    round_number,
                    left,
                    ", ".join(repr(f.worker.name) for f in awaiting),
                    len(collector.results),
                )
                told = True
            for failure in awaiting:
                log.info(
                    "round %d: asking %r again in %.0f s",
                    round_number,
                    failure.worker.name,
                    min(delay, left),
                    extra={
                        "event": "awaiting_approval",
                        "round": round_number,
                        "worker": failure.worker.name,
                        "retry_in": round(min(delay, left), 1),
                    },
                )
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, most)
            idle = {s.worker_id: s for s in ctx.registry.idle()}
            again = [f for f in awaiting if f.worker.worker_id in idle]
            if not again:
                return  # they left: a reconnected worker is a new session, for the next attempt
            collector.reopen(again)
            payload = ctx.payload()
            for failure in again:
                instruction = self._instructions[failure.worker.worker_id]
                task = ctx.fit_task(round_number, instruction, payload)
                collector.add(ctx.issue(idle[failure.worker.worker_id], collector, task, payload))
            await collector.wait(ctx.config.limits.round_timeout)

    async def _collect(self, collector: FitCollector) -> None:
        """Wait for the round's results while the previous round's report completes."""
        waiting = asyncio.create_task(collector.wait(self.context.config.limits.round_timeout))
        try:
            await self.context.reports.drain()
            await waiting
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting

    def _dispatch_fit(self, round_number: int) -> FitCollector | None:
        """Ask the strategy who trains, and send each of them the plan and the model; None
        when fewer workers than a round needs are idle any more."""
        ctx, cfg = self.context, self.context.config
        idle = {s.worker_id: s for s in ctx.registry.idle()}
        if len(idle) < cfg.results_needed:
            # A worker left after wait_for_idle saw enough (its wake-up runs later than the
            # check). Dispatching anyway would let the round count fewer results than
            # --min-results, since a round needs no more results than it issued tasks.
            return None
        instructions = ctx.strategy.configure_fit(
            round_number, [s.info for s in idle.values()], cfg.train
        )
        if not instructions:
            raise ConfigError(f"strategy selected no workers for round {round_number}")
        selected = ctx.select([i.worker for i in instructions], idle)
        payload = ctx.payload()
        aggregator = ctx.strategy.start_aggregation(round_number, ctx.weights)
        collector: FitCollector
        setup: pb.SecAggSetup | None = None
        if cfg.secagg is not None:
            params, weight_norm = cfg.secagg, None
            dp = ClientDP.from_extra(instructions[0].config.extra)
            if dp is not None:
                # Every worker sends weight 1; each coordinate of a clipped, noised update must
                # fit the fixed-point range untouched (clipping a noise share would remove noise).
                weight_norm = 1.0
                span = dp.clip_norm + 8 * dp.noise_std
                if params.clip < span:
                    params = replace(params, clip=span)
            secure = SecAggCollector(
                round_number,
                aggregator,
                ctx.weights,
                params,
                selected,
                cfg.results_needed,
                weight_norm=weight_norm,
                job_id=ctx.job_id,
            )
            setup = secure.setup_proto()
            ctx.route_secagg(secure.on_message)
            collector = secure
        else:
            # A streaming strategy folds chunks as they arrive; its exact sum's scale comes from
            # the most weight the round can carry: each claim is bounded by the announcement.
            budget = None
            if ctx.strategy.update_access is UpdateAccess.STREAM:
                budget = float(sum(max(s.num_examples, 1) for s in selected))
            collector = FitCollector(
                round_number,
                aggregator,
                ctx.weights,
                compression=cfg.compression,
                weight_budget=budget,
            )
        ctx.collector = collector
        self._instructions = {i.worker.worker_id: i for i in instructions}
        for instruction, session in zip(instructions, selected, strict=True):
            task = ctx.fit_task(round_number, instruction, payload, setup)
            collector.add(ctx.issue(session, collector, task, payload))
        log.info(
            "round %d: %d worker(s) training",
            round_number,
            len(instructions),
            extra={"event": "round_started", "round": round_number, "workers": len(instructions)},
        )
        return collector

    async def _federated_evaluate(self, round_number: int) -> dict[str, float]:
        """Evaluate the new global model on the idle workers' data, when the strategy asks."""
        ctx = self.context
        idle = {s.worker_id: s for s in ctx.registry.idle()}
        chosen = ctx.strategy.configure_evaluate(round_number, [s.info for s in idle.values()])
        if not chosen:
            return {}
        payload = ctx.payload()
        collector = EvaluateCollector(round_number)
        for session in ctx.select(chosen, idle):
            task = ctx.evaluate_task(round_number, payload)
            collector.add(ctx.issue(session, collector, task, payload))
        await collector.wait(ctx.config.limits.round_timeout)
        return ctx.strategy.aggregate_evaluate(round_number, collector.results)
