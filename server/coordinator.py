"""The coordinator: the federation's lifecycle around the round engines.

:class:`Coordinator` serves workers (:mod:`.transport`), waits until enough have joined,
resumes from a checkpoint, hands a :class:`~.engine.context.RoundContext` to the round engine
the strategy asks for (:class:`~.engine.sync.SyncEngine`, or
:class:`~.engine.fedbuff.FedBuffEngine` for a strategy with ``async_settings``), publishes
progress to its sinks (:mod:`.reporting`), and shuts down: workers are told the federation is
over, the last completed round's model is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2

from fedcore.enrollment import Enrollment
from fedcore.errors import CheckpointError, ConfigError, RoundFailedError
from fedcore.frozen import split_weights, trainable_names
from fedcore.models import build_model, get_weights
from fedcore.privacy import DifferentialPrivacy
from fedcore.strategy import (
    Strategy,
    WorkerInfo,
    check_round_size,
    check_secure_aggregation,
    load_strategy,
)
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

from .analytics.hook import serve_analytics
from .engine.context import RoundContext
from .engine.evaluation import central_evaluator
from .engine.fedbuff import FedBuffEngine
from .engine.reports import ReportPipeline
from .engine.sync import SyncEngine
from .reporting.metrics import CoordinatorStatus, MetricsWriter, RoundMetrics, save_weights
from .reporting.progress import LiveDisplay, PlainSummary
from .reporting.roster import ConnectedWorker, connected_workers, format_roster
from .reporting.sink import Sink, run_name
from .state.checkpoint import Checkpointer
from .state.config import ServerConfig
from .state.noise_check import check_noise_scale
from .state.privacy import wrap_strategy
from .state.registry import WorkerRegistry
from .transport.auth import Authenticator
from .transport.revocation import watch_revocations
from .transport.service import CoordinatorService, start_grpc_server

__all__ = ["Coordinator", "FederationResult", "prepare_strategy"]

log = logging.getLogger("fedcore.server")


@dataclass
class FederationResult:
    """What a finished federation produced."""

    weights: Weights
    rounds: list[RoundMetrics]


def prepare_strategy(config: ServerConfig, strategy: Strategy | None) -> Strategy:
    """The federation's strategy (``config.strategy`` unless one is given), made
    differentially private when ``config.dp`` asks, and checked against secure aggregation."""
    chosen = strategy or load_strategy(config.strategy, config.strategy_options)
    secure = config.secagg is not None
    if config.dp is not None:
        chosen = wrap_strategy(
            chosen,
            config.dp,
            rounds=config.rounds,
            min_updates=config.results_needed,
            secure_aggregation=secure,
        )
    elif isinstance(chosen, DifferentialPrivacy) and chosen.secure_aggregation != secure:
        raise ConfigError(
            f"the DifferentialPrivacy strategy was built with secure_aggregation="
            f"{chosen.secure_aggregation}, but the federation runs "
            f"{'with' if secure else 'without'} --secagg; pass secure_aggregation={secure}"
        )
    check_secure_aggregation(chosen, secure_aggregation=secure)
    if chosen.async_settings is None:
        check_round_size(
            chosen,
            results_needed=config.results_needed,
            flag="--min-results" if config.min_results is not None else "--min-workers",
        )
    if config.compression != "none" and chosen.async_settings is not None:
        raise ConfigError(
            f"--compression {config.compression} is not supported with the asynchronous "
            f"strategy {config.strategy}; use a synchronous strategy or drop --compression"
        )
    if config.recovery.checkpoint_dir is not None and chosen.async_settings is not None:
        raise ConfigError(
            f"--checkpoint-dir does not support the asynchronous strategy "
            f"{config.strategy!r} yet; use a synchronous strategy or drop --checkpoint-dir"
        )
    return chosen


class Coordinator:
    """Runs a federation; ``await Coordinator(config).run()`` or use ``fed-server``.

    Extra :class:`~.reporting.sink.Sink` s appended to :attr:`sinks` before :meth:`run`
    receive the progress and every round too.
    """

    def __init__(self, config: ServerConfig, strategy: Strategy | None = None) -> None:
        self.config = config
        self.strategy = prepare_strategy(config, strategy)
        if config.output.threads:
            torch.set_num_threads(config.output.threads)
        model = build_model(config.model, seed=config.seed)
        # Shared, not copied: the model is dropped right away, so a large model costs 1x here.
        weights: Weights = get_weights(model, copy=False)
        trainable = trainable_names(model, config.trainable) if config.trainable else list(weights)
        del model
        self.signature = signature_of(weights)
        if isinstance(self.strategy, DifferentialPrivacy) and self.strategy.noise_multiplier:
            check_noise_scale(
                noise_multiplier=self.strategy.noise_multiplier,
                clip_norm=self.strategy.clip_norm,
                # A round aggregates at least this many updates: the noise is at most this.
                min_updates=max(self.strategy.min_updates, config.results_needed),
                # Noise goes into what rounds train: the trainable part.
                weights=split_weights(weights, trainable)[0],
            )
        self.registry = WorkerRegistry(config.require_tags)
        authenticator = Authenticator(
            Enrollment(config.security.enrolled) if config.security.enrolled is not None else None,
            mutual_tls=config.security.tls is not None and config.security.tls.mutual,
        )
        self.service = CoordinatorService(
            config, self.registry, config.model, self.signature, authenticator
        )
        # Federated analytics (server/analytics): its own service beside Join.
        self.analytics = serve_analytics(config.analytics, self.registry, self.service)
        evaluator = central_evaluator(config)
        self.port: int | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._phase = "waiting for workers"
        #: Where progress and completed rounds go; filled by :meth:`run`.
        self.sinks: list[Sink] = []
        self._checkpointer = (
            Checkpointer(
                config.recovery.checkpoint_dir,
                {"model": repr(config.model), "strategy": config.strategy},
                {"strategy": self.strategy},
            )
            if config.recovery.checkpoint_dir is not None
            else None
        )
        # The first round to run: 1, or the one after the checkpoint's with --resume.
        self.start_round = 1
        restored: list[RoundMetrics] = []
        if config.recovery.resume:
            weights, restored = self._resume(weights)
        self.reports = ReportPipeline(
            self.strategy, evaluator, self.sinks, self._checkpointer, restored
        )
        if self.start_round > 1:
            self.reports.durable = weights  # the checkpoint's model is on disk already
        # Rounds (strategies, secure aggregation, DP, compression) see the trainable part only.
        rounds_see, frozen = split_weights(weights, trainable)
        if frozen:
            log.info(
                "%d of %d parameter tensors are frozen (%.1f MB, sent once per worker); "
                "rounds move %.1f MB",
                len(frozen),
                len(weights),
                sum(a.nbytes for a in frozen.values()) / 1e6,
                sum(a.nbytes for a in rounds_see.values()) / 1e6,
            )
        self.context = RoundContext(
            config,
            self.strategy,
            rounds_see,
            self.service,
            self.reports,
            frozen=frozen,
            model_order=list(weights),
        )
        self.context.rounds_completed = self.start_round - 1

    @property
    def weights(self) -> Weights:
        """The global model (frozen parameters included): the last completed round's."""
        return self.context.model_weights(self.context.weights)

    # ------------------------------------------------------------------ resume

    def _resume(self, weights: Weights) -> tuple[Weights, list[RoundMetrics]]:
        """The checkpoint's model and rows (and strategy state), or ``weights`` and no rows
        when there is no checkpoint yet."""
        assert self._checkpointer is not None
        directory = self._checkpointer.directory
        checkpoint = self._checkpointer.load()
        if checkpoint is None:
            log.info("no checkpoint in %s yet: starting from round 1", directory)
            return weights, []
        # safetensors sorts tensor names: compare as sets, then restore the model's order.
        if set(signature_of(checkpoint.weights)) != set(self.signature):
            raise CheckpointError(f"the checkpoint in {directory} holds weights of another shape")
        self._checkpointer.restore(checkpoint.states)
        self.start_round = checkpoint.round + 1
        log.info(
            "resuming from the checkpoint of round %d in %s",
            checkpoint.round,
            directory,
            extra={"event": "resumed", "round": checkpoint.round},
        )
        return (
            {spec.name: checkpoint.weights[spec.name] for spec in self.signature},
            [RoundMetrics(**row) for row in checkpoint.metrics],
        )

    # ------------------------------------------------------------------ progress

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers connected now (with their datasets' metadata in ``dataset``)."""
        return [s.info for s in self.registry.sessions()]

    def roster(self) -> list[ConnectedWorker]:
        """Who is connected, with what data, and whether rounds may select them."""
        return connected_workers(self.registry.sessions())

    def status(self) -> CoordinatorStatus:
        """A snapshot of the federation's progress (for displays and metrics exporters)."""
        collector = self.context.collector
        rows = self.reports.rows
        started = self.reports.started
        return CoordinatorStatus(
            phase=self._phase,
            round=self.context.round or min(len(rows) + (1 if started else 0), self.config.rounds),
            rounds=self.config.rounds,
            connected=len(self.registry),
            # A closed round has released its tickets; it still handed out `issued` tasks.
            training=(
                0
                if collector is None
                else collector.issued
                if collector.closed
                else len(collector.tickets)
            ),
            reported=collector.reported if collector is not None else 0,
            min_workers=self.config.min_workers,
            bytes_sent=self.service.counters.bytes_sent,
            bytes_received=self.service.counters.bytes_received,
            elapsed_s=self.reports.elapsed_s(time.perf_counter()) if started else 0.0,
            last=rows[-1] if rows else None,
            rounds_completed=max(self.context.rounds_completed, len(rows)),
        )

    def _make_exporters(self) -> list[Sink]:
        """Prometheus, MLflow and TensorBoard, those asked for (before serving: a busy port or
        an unusable store fails fast). Each library is imported only when its flag is used."""
        cfg = self.config
        exporters: list[Sink] = []
        run = run_name(str(cfg.model), cfg.strategy)  # one name in every tracker
        try:
            if cfg.output.metrics_port is not None:
                from .reporting.prometheus import PrometheusExporter

                host = cfg.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
                exporters.append(PrometheusExporter(host, cfg.output.metrics_port))
            if cfg.output.mlflow_uri is not None:
                from .reporting.mlflow import MlflowSink

                exporters.append(
                    MlflowSink(
                        cfg.output.mlflow_uri, cfg.output.mlflow_experiment, cfg.describe(), run
                    )
                )
            if cfg.output.tensorboard_dir is not None:
                from .reporting.tensorboard import TensorBoardSink

                exporters.append(TensorBoardSink(cfg.output.tensorboard_dir, run))
        except BaseException:
            for exporter in exporters:
                exporter.close(self.status(), [])
            raise
        return exporters

    def _make_display(self) -> Sink:
        mode = self.config.output.progress
        if mode == "live" or (mode == "auto" and sys.stdout.isatty()):
            return LiveDisplay()
        return PlainSummary()

    async def _publish_status(self) -> None:
        while True:
            status = self.status()
            for sink in self.sinks:
                sink.update(status)
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the federation to end after telling workers (safe from signal handlers)."""
        self._stop.set()

    async def run(self) -> FederationResult:
        """Serve, run every round, tell workers to shut down, stop serving."""
        exporters = self._make_exporters()
        try:
            server, health, self.port = await start_grpc_server(
                self.service,
                self.config.listen,
                (self.analytics.register,) if self.analytics is not None else (),
            )
        except BaseException:
            for exporter in exporters:
                exporter.close(self.status(), [])
            raise
        log.debug("listening on %s:%d", self.config.listen.rsplit(":", 1)[0], self.port)
        display = self._make_display()
        # The live display shows rounds itself; plain mode prints a table row per round.
        writer = MetricsWriter(
            self.config.output.metrics_out, None if isinstance(display, LiveDisplay) else sys.stdout
        )
        writer.restore(self.reports.rows)
        self.sinks[:0] = [writer, display, *exporters]
        self.ready.set()
        publisher = asyncio.create_task(self._publish_status())
        # What workers are told; None: nothing, so they keep reconnecting (a stop before the
        # last round is a pause that `--resume` continues, not the end of the federation).
        ending: str | None = "the federation ended with an error on the coordinator"
        revocations = asyncio.create_task(
            watch_revocations(
                self.service.authenticator, self.registry, self.config.limits.enrollment_poll
            )
        )
        try:
            analytics_only = self.config.analytics is not None and self.config.analytics.only
            runner = asyncio.create_task(
                self._stop.wait() if analytics_only else self._run_rounds()
            )
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if runner not in done:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
                # A completed round's report (metrics row, checkpoint) is still written.
                await self.reports.drain_for(self.config.limits.shutdown_grace + 60)
                if not analytics_only:
                    log.warning(
                        "stopped before the last round; the model of the last completed "
                        "round is kept; workers were not told the federation is over: they "
                        "keep reconnecting, and fed-server --resume continues with them"
                    )
            stopper.cancel()
            if runner in done and (failure := runner.exception()) is not None:
                ending = f"the federation failed: {failure}"
                raise failure
            rows = list(self.reports.rows)
            if analytics_only:
                ending = "the analytics service stopped"
            elif runner in done:
                ending = f"training finished after {len(rows)} round{'s' * (len(rows) != 1)}"
            else:
                ending = None
            if self.config.output.save_model is not None:
                save_weights(
                    self.reports.exportable(self.weights),
                    self.config.output.save_model,
                    {"model": str(self.config.model), "rounds": str(len(rows))},
                )
                log.info("saved the global model to %s", self.config.output.save_model)
            return FederationResult(self.weights, rows)
        finally:
            publisher.cancel()
            revocations.cancel()
            self._phase = "finished"
            final = self.status()
            for sink in self.sinks:
                sink.close(final, list(self.reports.rows))
            await self._shutdown(server, health, ending)

    async def _run_rounds(self) -> None:
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
        if not await self.registry.wait_for_idle(cfg.min_workers, cfg.limits.join_timeout):
            tags = " ".join("#" + t for t in cfg.require_tags)
            raise RoundFailedError(
                f"only {len(self.registry.idle())} of {cfg.min_workers} workers"
                f"{' tagged ' + tags if tags else ''} joined within {cfg.limits.join_timeout:g} s; "
                "start more workers or lower --min-workers"
            )
        log.info("%s", format_roster(self.roster(), cfg.require_tags))
        self.reports.start_clock()
        self._phase = "training"
        settings = self.strategy.async_settings
        if settings is not None:
            await FedBuffEngine(self.context, settings).run()
        else:
            await SyncEngine(self.context).run(self.start_round)

    async def _shutdown(self, server: grpc.aio.Server, health: object, reason: str | None) -> None:
        """Stop serving. ``reason``: tell every worker the federation is over; None: end the
        streams without a Shutdown, so workers reconnect (to a resumed coordinator)."""
        self.service.accepting = False
        with contextlib.suppress(Exception):
            for name in ("", "fedcore.v1.Coordinator"):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # type: ignore[attr-defined]
        sessions = self.registry.sessions()
        for s in sessions:
            if reason is not None:
                s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason=reason)))
            s.send(None)
        if sessions:
            await asyncio.wait(
                [asyncio.create_task(s.closed.wait()) for s in sessions],
                timeout=self.config.limits.shutdown_grace,
            )
        await server.stop(self.config.limits.shutdown_grace)
