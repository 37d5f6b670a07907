"""A one-shot federation: ``fed-server --rounds N ...`` as one job on a network of its own.

:class:`Coordinator` builds a :class:`~.network.Network` without a state folder (it admits
only workers with the job's model), the flags' :class:`~.jobs.job.TrainingJob` on it (a job's
whole life, the same code a standing network's jobs run), and what only a one-shot federation
has: its progress display and metrics file, experiment trackers, the saved model, and its
ends: finishing tells the workers the federation is over (they exit), a failure is raised
(fed-server's exit status), and a stop before the last round (SIGINT/SIGTERM) tells them
nothing, so they keep reconnecting and ``fed-server --resume`` continues with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass

from fedcore.strategy import Strategy, WorkerInfo
from fedcore.weights import Weights

from .engine.context import RoundContext
from .engine.reports import ReportPipeline
from .jobs.job import TrainingJob, job_start
from .network import Network, NetworkSettings
from .reporting.metrics import CoordinatorStatus, MetricsWriter, RoundMetrics, save_weights
from .reporting.progress import LiveDisplay, PlainSummary
from .reporting.roster import ConnectedWorker, connected_workers
from .reporting.sink import Sink, run_name
from .state.config import ServerConfig

__all__ = ["Coordinator", "FederationResult"]

log = logging.getLogger("fedcore.server")


@dataclass
class FederationResult:
    """What a finished federation produced."""

    weights: Weights
    rounds: list[RoundMetrics]


class Coordinator:
    """Runs a federation; ``await Coordinator(config).run()`` or use ``fed-server``.

    Extra :class:`~.reporting.sink.Sink` s appended to :attr:`sinks` before :meth:`run`
    receive the progress and every round too. Invalid settings, model or checkpoint raise
    here, before anything is served.
    """

    def __init__(self, config: ServerConfig, strategy: Strategy | None = None) -> None:
        self.config = config
        start = job_start(config, strategy)
        self.strategy = start.strategy
        self.signature = start.signature
        self.network = Network(config, NetworkSettings(), model=(config.model, start.signature))
        self.registry = self.network.registry
        self.service = self.network.service
        self.analytics = self.network.analytics
        self.ready = self.network.ready
        #: Where progress and completed rounds go; filled by :meth:`run`.
        self.sinks: list[Sink] = []
        record = self.network.store.submit(
            study="", scientist="fed-server", kind="train", settings={}, rounds=config.rounds
        )
        self.job = TrainingJob(record, self.network.environment, self.sinks)
        self.job.prepare(start)
        self._finished = False

    @property
    def port(self) -> int | None:
        """The port served on (None before :meth:`run` serves)."""
        return self.network.port

    @property
    def context(self) -> RoundContext:
        """The job's round context (its global model, round in progress)."""
        assert self.job.context is not None  # prepared in __init__
        return self.job.context

    @property
    def reports(self) -> ReportPipeline:
        """The job's completed rounds and their reports."""
        assert self.job.reports is not None  # prepared in __init__
        return self.job.reports

    @property
    def start_round(self) -> int:
        """The first round to run: 1, or the one after the checkpoint's with ``--resume``."""
        return self.job.first_round

    @property
    def weights(self) -> Weights:
        """The global model (frozen parameters included): the last completed round's."""
        return self.context.model_weights(self.context.weights)

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
            phase="finished" if self._finished else self.job.phase,
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
        """Ask the federation to end without telling workers (safe from signal handlers)."""
        self.network.stop()

    async def run(self) -> FederationResult:
        """Serve, run the job, tell workers why the federation is over, stop serving."""
        exporters = self._make_exporters()
        try:
            async with self.network.serving():
                display = self._make_display()
                # The live display shows rounds itself; plain mode prints a row per round.
                writer = MetricsWriter(
                    self.config.output.metrics_out,
                    None if isinstance(display, LiveDisplay) else sys.stdout,
                )
                writer.restore(self.reports.rows)
                self.sinks[:0] = [writer, display, *exporters]
                exporters = []  # the sinks' now: closed with them
                publisher = asyncio.create_task(self._publish_status())
                try:
                    return await self._federate()
                finally:
                    publisher.cancel()
                    self._finished = True
                    final = self.status()
                    for sink in self.sinks:
                        sink.close(final, list(self.reports.rows))
        finally:
            for exporter in exporters:
                exporter.close(self.status(), [])

    async def _federate(self) -> FederationResult:
        """Run the job (or, analytics only, nothing) until it ends or :meth:`stop`; set what
        the workers are told."""
        cfg, network = self.config, self.network
        network.farewell = "the federation ended with an error on the coordinator"
        analytics_only = cfg.analytics is not None and cfg.analytics.only
        if not analytics_only:
            log.info(
                "waiting for %d worker(s) on port %s (model %s, %d rounds)",
                cfg.min_workers,
                self.port,
                cfg.model,
                cfg.rounds,
            )
        runner = asyncio.create_task(network.stopped() if analytics_only else self.job.run())
        stopper = asyncio.create_task(network.stopped())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if runner not in done:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            # A completed round's report (metrics row, checkpoint) is still written.
            await self.reports.drain_for(cfg.limits.shutdown_grace + 60)
            if not analytics_only:
                log.warning(
                    "stopped before the last round; the model of the last completed "
                    "round is kept; workers were not told the federation is over: they "
                    "keep reconnecting, and fed-server --resume continues with them"
                )
        else:
            failure = runner.exception() or (None if analytics_only else self.job.failure)
            if failure is not None:
                network.farewell = f"the federation failed: {failure}"
                raise failure
        rows = list(self.reports.rows)
        if analytics_only:
            network.farewell = "the analytics service stopped"
        elif runner in done:
            network.farewell = f"training finished after {len(rows)} round{'s' * (len(rows) != 1)}"
        else:
            network.farewell = None
        if cfg.output.save_model is not None:
            save_weights(
                self.reports.exportable(self.weights),
                cfg.output.save_model,
                {"model": str(cfg.model), "rounds": str(len(rows))},
            )
            log.info("saved the global model to %s", cfg.output.save_model)
        return FederationResult(self.weights, rows)
