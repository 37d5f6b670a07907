"""The coordinator: waits for workers, runs rounds through the strategy's hooks, reports.

A round sends each selected worker a plan (a Task whose weights follow as chunks, serialized
as each stream sends them), folds valid updates into the running aggregate as they
arrive, and completes when every worker answered or the round timeout passed. With fewer than
``min_workers`` results the round is retried (at most ``round_retries`` times); the global
model only ever changes from a completed round. A strategy with ``async_settings`` (FedBuff)
runs the asynchronous loop of :mod:`.async_loop` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import resource
import sys
import time
import uuid
from dataclasses import dataclass, replace

import grpc
import torch
from grpc_health.v1 import health_pb2

from fedcore.compression import EXTRA_KEY, scheme_code
from fedcore.enrollment import Enrollment
from fedcore.errors import CheckpointError, ConfigError, PrivacyBudgetExhausted, RoundFailedError
from fedcore.models import build_model, get_weights
from fedcore.privacy import ClientDP, DifferentialPrivacy
from fedcore.strategy import (
    Strategy,
    WorkerInfo,
    check_round_size,
    check_secure_aggregation,
    load_strategy,
    weighted_metrics,
)
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

from .auth import Authenticator
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import ServerConfig
from .evaluation import CentralEvaluator
from .payloads import WeightsPayload
from .privacy import privacy_metrics, public_train_metrics, wrap_strategy
from .progress import CoordinatorStatus, LiveDisplay, Observer, PlainSummary
from .registry import Ticket, WorkerRegistry, WorkerSession
from .reporting import MetricsWriter, RoundMetrics, save_weights
from .roster import ConnectedWorker, connected_workers, format_roster
from .rounds import EvaluateCollector, FitCollector, RoundCollector
from .secagg import SecAggCollector
from .service import CoordinatorService, start_grpc_server

__all__ = ["ConnectedWorker", "Coordinator", "FederationResult", "peak_rss_bytes"]

log = logging.getLogger("fedcore.server")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class FederationResult:
    """What a finished federation produced."""

    weights: Weights
    rounds: list[RoundMetrics]


class Coordinator:
    """Runs a federation; ``await Coordinator(config).run()`` or use ``fed-server``."""

    def __init__(self, config: ServerConfig, strategy: Strategy | None = None) -> None:
        self.config = config
        self.strategy = strategy or load_strategy(config.strategy, config.strategy_options)
        if config.dp is not None:
            self.strategy = wrap_strategy(
                self.strategy,
                config.dp,
                rounds=config.rounds,
                min_updates=config.results_needed,
                secure_aggregation=config.secagg is not None,
            )
        elif isinstance(self.strategy, DifferentialPrivacy):
            self.strategy.secure_aggregation = config.secagg is not None
        check_secure_aggregation(self.strategy, secure_aggregation=config.secagg is not None)
        if self.strategy.async_settings is None:
            check_round_size(
                self.strategy,
                results_needed=config.results_needed,
                flag="--min-results" if config.min_results is not None else "--min-workers",
            )
        if config.threads:
            torch.set_num_threads(config.threads)
        model = build_model(config.model, seed=config.seed)
        # Shared, not copied: the model is dropped right away, so a large model costs 1x here.
        self.weights: Weights = get_weights(model, copy=False)
        del model
        self.signature = signature_of(self.weights)
        if config.compression != "none" and self.strategy.async_settings is not None:
            raise ConfigError(
                f"--compression {config.compression} is not supported with the asynchronous "
                f"strategy {config.strategy}; use a synchronous strategy or drop --compression"
            )
        self.registry = WorkerRegistry(config.max_workers, config.require_tags)
        authenticator = Authenticator(
            Enrollment(config.enrolled) if config.enrolled is not None else None,
            mutual_tls=config.tls is not None and config.tls.mutual,
        )
        self.service = CoordinatorService(
            config, self.registry, config.model, self.signature, authenticator
        )
        self.evaluator = (
            CentralEvaluator(config.model, config.eval_data, config.eval_batch_size, config.device)
            if config.eval_data is not None
            else None
        )
        self.port: int | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        # Progress, for status(): the round in progress and its collector.
        self.observers: list[Observer] = []
        self._phase = "waiting for workers"
        self._round = 0
        self._collector: RoundCollector | None = None
        self._rows: list[RoundMetrics] = []
        self._started = 0.0  # perf_counter() when round 1 (or the first resumed round) began
        # Training time before this run (from the checkpoint's rows): elapsed_s goes on
        # counting across --resume instead of restarting at 0.
        self._elapsed_before = 0.0
        self._aggregated = 0  # rounds whose global model exists (their report may be pending)
        self._end_requested = False  # the strategy's on_round_end asked to stop
        # The first round to run: 1, or the one after the checkpoint's with --resume.
        self.start_round = 1
        self._restored_rows: list[RoundMetrics] = []
        self._pending_report: asyncio.Task[None] | None = None
        if config.checkpoint_dir is not None and self.strategy.async_settings is not None:
            raise ConfigError(
                f"--checkpoint-dir does not support the asynchronous strategy "
                f"{config.strategy!r} yet; use a synchronous strategy or drop --checkpoint-dir"
            )
        if config.resume:
            self._resume()

    # ------------------------------------------------------------------ checkpoints

    def _stateful(self) -> dict[str, object]:
        """Components whose state_dict() goes into checkpoints, by name."""
        return {"strategy": self.strategy}

    def _fingerprint(self) -> dict[str, str]:
        return {"model": repr(self.config.model), "strategy": self.config.strategy}

    def _snapshot_states(self) -> dict[str, dict[str, object]]:
        states: dict[str, dict[str, object]] = {}
        for name, component in self._stateful().items():
            state_dict = getattr(component, "state_dict", None)
            if callable(state_dict):
                states[name] = copy.deepcopy(dict(state_dict()))
        return states

    def _resume(self) -> None:
        assert self.config.checkpoint_dir is not None
        checkpoint = load_checkpoint(self.config.checkpoint_dir)
        if checkpoint is None:
            log.info("no checkpoint in %s yet: starting from round 1", self.config.checkpoint_dir)
            return
        if checkpoint.fingerprint != self._fingerprint():
            raise CheckpointError(
                f"the checkpoint in {self.config.checkpoint_dir} belongs to another federation "
                f"({checkpoint.fingerprint}, this one is {self._fingerprint()}); use another "
                "--checkpoint-dir or the same --model/--model-params/--strategy"
            )
        # safetensors sorts tensor names: compare as sets, then restore the model's order.
        if set(signature_of(checkpoint.weights)) != set(self.signature):
            raise CheckpointError(
                f"the checkpoint in {self.config.checkpoint_dir} holds weights of another shape"
            )
        self.weights = {spec.name: checkpoint.weights[spec.name] for spec in self.signature}
        for name, component in self._stateful().items():
            state = checkpoint.states.get(name)
            load = getattr(component, "load_state_dict", None)
            if state is not None and callable(load):
                load(state)
        self._restored_rows = [RoundMetrics(**row) for row in checkpoint.metrics]
        if self._restored_rows:
            self._elapsed_before = self._restored_rows[-1].elapsed_s
        self.start_round = checkpoint.round + 1
        self._aggregated = checkpoint.round
        log.info(
            "resuming from the checkpoint of round %d in %s",
            checkpoint.round,
            self.config.checkpoint_dir,
        )

    async def _checkpoint(
        self,
        round_number: int,
        weights: Weights,
        states: dict[str, dict[str, object]],
        rows: list[RoundMetrics],
    ) -> None:
        directory = self.config.checkpoint_dir
        if directory is None:
            return
        checkpoint = Checkpoint(
            round=round_number,
            weights=weights,
            metrics=[r.to_json() for r in rows],
            states=states,
            fingerprint=self._fingerprint(),
        )
        path = await asyncio.to_thread(save_checkpoint, directory, checkpoint)
        log.info("round %d checkpointed to %s", round_number, path)

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers connected now (with their datasets' metadata in ``dataset``)."""
        return [s.info for s in self.registry.sessions()]

    def roster(self) -> list[ConnectedWorker]:
        """Who is connected, with what data, and whether rounds may select them."""
        return connected_workers(self.registry.sessions())

    def status(self) -> CoordinatorStatus:
        """A snapshot of the federation's progress (for displays and metrics exporters)."""
        collector = self._collector
        cfg_rounds = self.config.rounds
        training = reported = 0
        if collector is not None:
            # A closed round has released its tickets; it still handed out `issued` tasks.
            training = collector.issued if collector.closed else len(collector.tickets)
            results = getattr(collector, "results", [])
            reported = len(results) if isinstance(results, list) else 0
        return CoordinatorStatus(
            phase=self._phase,
            # The asynchronous loop counts global updates as rounds.
            round=self._round or min(len(self._rows) + (1 if self._started else 0), cfg_rounds),
            rounds=self.config.rounds,
            connected=len(self.registry),
            training=training,
            reported=reported,
            min_workers=self.config.min_workers,
            bytes_sent=self.service.counters.bytes_sent,
            bytes_received=self.service.counters.bytes_received,
            elapsed_s=self._elapsed_before
            + (time.perf_counter() - self._started if self._started else 0.0),
            last=self._rows[-1] if self._rows else None,
            rounds_completed=max(self._aggregated, len(self._restored_rows) + len(self._rows)),
        )

    def _make_exporters(self) -> list[Observer]:
        """The Prometheus endpoint, when asked for (before serving: a busy port fails fast)."""
        if self.config.metrics_port is None:
            return []
        from .prometheus import PrometheusExporter

        host = self.config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        return [PrometheusExporter(host, self.config.metrics_port)]

    def _make_display(self) -> Observer:
        mode = self.config.progress
        if mode == "live" or (mode == "auto" and sys.stdout.isatty()):
            return LiveDisplay()
        return PlainSummary()

    async def _publish_status(self) -> None:
        while True:
            status = self.status()
            for observer in self.observers:
                observer.update(status)
            await asyncio.sleep(0.25)

    def stop(self) -> None:
        """Ask the federation to end after telling workers (safe from signal handlers)."""
        self._stop.set()

    async def run(self) -> FederationResult:
        """Serve, run every round, tell workers to shut down, stop serving."""
        exporters = self._make_exporters()
        try:
            server, health, self.port = await start_grpc_server(self.service, self.config.listen)
        except BaseException:
            for exporter in exporters:
                exporter.close(self.status(), [])
            raise
        host = self.config.listen.rsplit(":", 1)[0]
        print(f"listening on {host}:{self.port}", flush=True)
        self.observers = [self._make_display(), *exporters, *self.observers]
        live = any(isinstance(o, LiveDisplay) for o in self.observers)
        self.ready.set()
        # The live display shows rounds itself; plain mode prints a table row per round.
        writer = MetricsWriter(self.config.metrics_out, None if live else sys.stdout)
        writer.restore(self._restored_rows)
        publisher = asyncio.create_task(self._publish_status())
        ending = "the coordinator stopped before the last round"  # what workers are told
        try:
            runner = asyncio.create_task(self._run_rounds(writer))
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if runner not in done:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
                # A completed round's report (metrics row, checkpoint) is still written.
                report = self._pending_report
                if report is not None and not report.done():
                    await asyncio.wait({report}, timeout=self.config.shutdown_grace + 60)
                log.warning(
                    "stopped before the last round; the model of the last completed round is kept"
                )
            stopper.cancel()
            if runner in done:
                runner.result()  # re-raise a failure
            if self.config.save_model is not None:
                save_weights(
                    self.weights,
                    self.config.save_model,
                    {"model": str(self.config.model), "rounds": str(len(writer.rows))},
                )
                log.info("saved the global model to %s", self.config.save_model)
            if runner in done:
                done_rounds = len(writer.rows)
                ending = f"training finished after {done_rounds} round{'s' * (done_rounds != 1)}"
            return FederationResult(self.weights, list(writer.rows))
        finally:
            writer.close()
            publisher.cancel()
            self._phase = "finished"
            final = self.status()
            for observer in self.observers:
                observer.close(final, list(writer.rows))
            await self._shutdown(server, health, ending)

    async def _shutdown(self, server: grpc.aio.Server, health: object, reason: str) -> None:
        self.service.accepting = False
        with contextlib.suppress(Exception):
            for name in ("", "fedcore.v1.Coordinator"):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # type: ignore[attr-defined]
        sessions = self.registry.sessions()
        for s in sessions:
            s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason=reason)))
            s.send(None)
        if sessions:
            await asyncio.wait(
                [asyncio.create_task(s.closed.wait()) for s in sessions],
                timeout=self.config.shutdown_grace,
            )
        await server.stop(self.config.shutdown_grace)

    # ------------------------------------------------------------------ rounds

    async def _run_rounds(self, writer: MetricsWriter) -> None:
        cfg = self.config
        log.info(
            "waiting for %d worker(s) on port %s (model %s, %d rounds)",
            cfg.min_workers,
            self.port,
            cfg.model,
            cfg.rounds,
        )
        if self.start_round > cfg.rounds:
            log.info("the checkpoint already holds all %d rounds", cfg.rounds)
            return
        if not await self.registry.wait_for_idle(cfg.min_workers, cfg.join_timeout):
            tags = " ".join("#" + t for t in cfg.require_tags)
            raise RoundFailedError(
                f"only {len(self.registry.idle())} of {cfg.min_workers} workers"
                f"{' tagged ' + tags if tags else ''} joined within {cfg.join_timeout:g} s; "
                "start more workers or lower --min-workers"
            )
        print(format_roster(self.roster(), cfg.require_tags), flush=True)
        self._started = time.perf_counter()
        self._phase = "training"
        if self.strategy.async_settings is not None:
            from .async_loop import AsyncRounds

            await AsyncRounds(self, writer, self.strategy.async_settings).run()
            return
        # A strategy that decides after each round sees that round's evaluation first.
        decides = type(self.strategy).on_round_end is not Strategy.on_round_end
        pending_report: asyncio.Task[None] | None = None
        for round_number in range(self.start_round, cfg.rounds + 1):
            self._round = round_number
            if pending_report is not None and decides:
                await pending_report
                pending_report = None
            if self._end_requested:
                log.info("the strategy ended the federation after round %d", round_number - 1)
                break
            started = time.perf_counter()
            sent0, recv0 = self.service.counters.bytes_sent, self.service.counters.bytes_received
            try:
                collector, attempts = await self._fit_round_with_retries(
                    round_number, pending_report
                )
            except PrivacyBudgetExhausted as exc:
                log.warning("privacy budget reached: %s", exc)
                break
            pending_report = None
            self._aggregated = round_number
            # Taken now: the next round's configure_fit may change the strategy's state.
            states = self._snapshot_states() if cfg.checkpoint_dir is not None else {}
            fed_metrics: dict[str, float] = {}
            every = cfg.federated_eval_every
            if every and (round_number % every == 0 or round_number == cfg.rounds):
                fed_metrics = await self._federated_evaluate(round_number)
            metrics = RoundMetrics(
                round=round_number,
                workers=len(collector.results),
                failures=len(collector.failures),
                duration_s=0.0,
                bytes_sent=self.service.counters.bytes_sent - sent0,
                bytes_received=self.service.counters.bytes_received - recv0,
                attempts=attempts,
                train=weighted_metrics(public_train_metrics(collector.results)),
                federated=fed_metrics,
                refused={f.worker.name: f.reason for f in collector.failures if f.refused},
            )
            privacy = privacy_metrics(self.strategy, collector.results)
            if privacy is not None:
                metrics.privacy = privacy
                if "epsilon" in privacy:
                    metrics.epsilon, metrics.delta = privacy["epsilon"], privacy["delta"]
            # Centralized evaluation of this round's model overlaps the next round's training.
            pending_report = asyncio.create_task(
                self._report(writer, metrics, self.weights, started, states=states)
            )
            self._pending_report = pending_report
        if pending_report is not None:
            await pending_report

    async def _report(
        self,
        writer: MetricsWriter,
        metrics: RoundMetrics,
        weights: Weights,
        started: float,
        fit_done: float | None = None,
        *,
        states: dict[str, dict[str, object]] | None = None,
    ) -> None:
        if fit_done is None:
            fit_done = time.perf_counter()
        eval_started = time.perf_counter()
        if self.evaluator is not None:
            try:
                result = await asyncio.to_thread(self.evaluator.evaluate, weights)
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
        metrics.elapsed_s = round(self._elapsed_before + fit_done - self._started, 3)
        metrics.peak_rss_bytes = peak_rss_bytes()
        writer.write(metrics)
        self._rows.append(metrics)
        for observer in self.observers:
            observer.round_completed(metrics)
        if self.strategy.on_round_end(metrics.round, weights, metrics.to_json()):
            self._end_requested = True
        if states is not None:
            await self._checkpoint(metrics.round, weights, states, list(writer.rows))

    async def _fit_round_with_retries(
        self, round_number: int, pending_report: asyncio.Task[None] | None
    ) -> tuple[FitCollector, int]:
        cfg = self.config
        needed = cfg.results_needed
        for attempt in range(1, cfg.round_retries + 2):
            if not await self.registry.wait_for_idle(needed, cfg.round_timeout):
                log.warning(
                    "round %d: fewer than %d worker%s ready",
                    round_number,
                    needed,
                    "s are" if needed > 1 else " is",
                )
                if pending_report is not None:
                    await pending_report
                    pending_report = None
                continue
            collector = self._dispatch_fit(round_number)
            self._collector = collector
            # The round runs while the previous round is still being evaluated: a collector
            # that drives phases itself (secure aggregation) must not wait behind it.
            waiting = asyncio.create_task(collector.wait(cfg.round_timeout))
            try:
                if pending_report is not None:
                    await pending_report
                    pending_report = None
                await waiting
            finally:
                if not waiting.done():
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
                self.service.secagg_handler = None
            # A strategy that samples fewer workers than --min-results needs all of them.
            needed_now = min(needed, collector.issued)
            for failure in collector.failures:
                if not failure.answered:  # the inbox logged the worker's own answer already
                    log.warning(
                        "round %d: worker %r dropped: %s",
                        round_number,
                        failure.worker.name,
                        failure.reason,
                    )
            if len(collector.results) >= needed_now:
                aggregate = collector.aggregator.result()
                self.weights = self.strategy.aggregate_fit(
                    round_number, self.weights, aggregate, collector.results, collector.failures
                )
                return collector, attempt
            log.warning(
                "round %d attempt %d: %d valid result(s), %d needed; the global model is unchanged",
                round_number,
                attempt,
                len(collector.results),
                needed_now,
            )
            accounted = len(collector.results) + len(collector.failures) == collector.issued
            if collector.failures and accounted and all(f.answered for f in collector.failures):
                # Every missing worker answered with a failure of this very plan (a refusal,
                # training that diverged): the same plan on the same weights fails again.
                answers = "; ".join(f"{f.worker.name}: {f.reason}" for f in collector.failures)
                raise RoundFailedError(
                    f"round {round_number} cannot succeed: {len(collector.results)} valid "
                    f"result(s) of {needed_now} needed, and the other workers reported failures "
                    f"that a retry of the same plan would repeat ({answers})"
                )
        if pending_report is not None:
            await pending_report
        attempts = cfg.round_retries + 1
        raise RoundFailedError(
            f"round {round_number} failed {attempts} time{'s' if attempts > 1 else ''}: fewer "
            f"than {needed} worker{'s' if needed > 1 else ''} delivered valid results; see the "
            "warnings above"
        )

    def _issue(
        self,
        session: WorkerSession,
        collector: RoundCollector,
        task: pb.Task,
        payload: WeightsPayload,
    ) -> None:
        task.task_id = uuid.uuid4().hex
        ticket = Ticket(task.task_id, task.round, task.kind, session, collector=collector)
        session.assign(ticket)
        collector.tickets.append(ticket)
        session.send(pb.CoordinatorMessage(task=task))
        session.send(payload)

    def _dispatch_fit(self, round_number: int) -> FitCollector:
        sessions = {s.worker_id: s for s in self.registry.idle()}
        instructions = self.strategy.configure_fit(
            round_number, [s.info for s in sessions.values()], self.config.train
        )
        if not instructions:
            raise ConfigError(f"strategy selected no workers for round {round_number}")
        selected: list[WorkerSession] = []
        for instruction in instructions:
            session = sessions.get(instruction.worker.worker_id)
            if session is None:
                raise ConfigError(
                    f"strategy selected unknown or busy worker {instruction.worker.name!r}"
                )
            selected.append(session)
        payload = WeightsPayload(self.weights, self.config.chunk_bytes)
        aggregator = self.strategy.start_aggregation(round_number, self.weights)
        collector: FitCollector
        secagg: pb.SecAggSetup | None = None
        if self.config.secagg is not None:
            params, weight_norm = self.config.secagg, None
            dp = ClientDP.from_extra(instructions[0].config.extra)
            if dp is not None:
                # Every worker sends weight 1; each coordinate of a clipped, noised update must
                # fit the fixed-point range untouched (clipping a noise share would remove noise).
                weight_norm = 1.0
                span = dp.clip_norm + 8 * dp.noise_std
                if params.clip < span:
                    params = replace(params, clip=span)
            collector = SecAggCollector(
                round_number,
                aggregator,
                self.weights,
                params,
                selected,
                self.config.results_needed,
                weight_norm=weight_norm,
            )
            secagg = collector.setup_proto()
            self.service.secagg_handler = collector.on_message
        else:
            collector = FitCollector(
                round_number, aggregator, self.weights, compression=self.config.compression
            )
        model = self.config.model.to_proto()
        for instruction, session in zip(instructions, selected, strict=True):
            train = instruction.config.to_proto()
            if self.config.compression != "none":
                train.extra[EXTRA_KEY] = scheme_code(self.config.compression)
            task = pb.Task(
                round=round_number,
                kind=pb.TASK_KIND_FIT,
                model=model,
                train=train,
                weights=payload.header,
                secagg=secagg,
            )
            self._issue(session, collector, task, payload)
            if isinstance(collector, SecAggCollector):
                collector.attach(collector.tickets[-1])
        log.info("round %d: %d worker(s) training", round_number, len(instructions))
        return collector

    async def _federated_evaluate(self, round_number: int) -> dict[str, float]:
        idle = {s.worker_id: s for s in self.registry.idle()}
        chosen = self.strategy.configure_evaluate(round_number, [s.info for s in idle.values()])
        if not chosen:
            return {}
        payload = WeightsPayload(self.weights, self.config.chunk_bytes)
        collector = EvaluateCollector(round_number)
        model = self.config.model.to_proto()
        for worker in chosen:
            task = pb.Task(
                round=round_number, kind=pb.TASK_KIND_EVALUATE, model=model, weights=payload.header
            )
            self._issue(idle[worker.worker_id], collector, task, payload)
        await collector.wait(self.config.round_timeout)
        return self.strategy.aggregate_evaluate(round_number, collector.results)
