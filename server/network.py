"""A standing network: the long-lived coordinator that ``fed-server --serve`` runs.

:class:`Network` holds what outlives jobs: the gRPC server, the workers' registry and their
Join service (workers join once and stay), authentication and revocation, the Analytics and
Jobs services for data scientists, the job store (SQLite) and the coordinator's audit log.
Its :class:`~.jobs.scheduler.Scheduler` runs the queued jobs under one task group; each job's
life is :mod:`.jobs.job` (training) or :mod:`.jobs.query` (an analytics query).

Stopping the network (SIGINT/SIGTERM, or a crash) tells workers nothing: they keep
reconnecting, and the next start resumes the jobs that were running (``jobs.db``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2

from fedcore.auditlog import AuditLog
from fedcore.enrollment import Enrollment
from fedcore.errors import ConfigError

from .analytics.hook import serve_analytics
from .jobs.job import JobEnvironment, TrainingJob
from .jobs.query import QueryJob
from .jobs.scheduler import RunnableJob, Scheduler
from .jobs.service import JobsService
from .jobs.spec import job_config
from .jobs.store import JobRecord, JobStore
from .state.config import ServerConfig
from .state.registry import WorkerRegistry
from .transport.auth import Authenticator
from .transport.revocation import watch_revocations
from .transport.service import CoordinatorService, start_grpc_server

__all__ = ["Network", "NetworkSettings"]

log = logging.getLogger("fedcore.server")


@dataclass(frozen=True)
class NetworkSettings:
    """What only a standing network has (``fed-server --serve ...``).

    Args:
        state_dir: the job store, the jobs' checkpoints and models, the audit log.
        max_running: jobs run at once (a worker still takes one training task at a time).

    How long a job waits for its silos' owners to decide is the process's
    ``--approval-timeout`` (``Limits.approval_timeout``), as for a one-shot federation.
    """

    state_dir: Path
    max_running: int = 1

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ConfigError("--max-running-jobs must be at least 1")


class Network:
    """Serves workers and data scientists, and runs their jobs, until :meth:`stop`."""

    def __init__(self, config: ServerConfig, settings: NetworkSettings) -> None:
        if config.analytics is None:
            raise ConfigError(
                "--serve needs --scientists: a standing network's jobs are submitted by "
                "enrolled data scientists (fed-certs add-scientist --study STUDY)"
            )
        self.config = config
        self.settings = settings
        self.registry = WorkerRegistry()  # tags are judged per job (jobs/workers.py)
        authenticator = Authenticator(
            Enrollment(config.security.enrolled) if config.security.enrolled is not None else None,
            mutual_tls=config.security.tls is not None and config.security.tls.mutual,
        )
        # No model: every job judges its own workers (server/jobs/workers.py).
        self.service = CoordinatorService(config, self.registry, None, (), authenticator)
        self.analytics = serve_analytics(config.analytics, self.registry, self.service)
        self.store = JobStore(settings.state_dir / "jobs.db")
        self.audit = AuditLog(settings.state_dir / "audit.log")
        for record in self.store.recover():
            log.info(
                "job %s was running when the coordinator stopped: it resumes",
                record.id,
                extra={"event": "job_resumed", "job": record.id},
            )
            self.audit.append("resumed", job=record.id, rounds_done=record.rounds_done)
        self.environment = JobEnvironment(
            config,
            self.service,
            self.registry,
            self.store,
            self.audit,
            settings.state_dir,
        )
        self.scheduler = Scheduler(self.store, self._make_job, settings.max_running)
        self.jobs = JobsService(
            self.store,
            self.scheduler,
            Enrollment(config.analytics.scientists, section="scientists"),
            self.audit,
            settings.state_dir,
            config.limits.max_model_bytes,
            lambda job: job_config(config, job, "submitted"),
            counters=self.service.counters,
        )
        self.port: int | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def _make_job(self, record: JobRecord) -> RunnableJob:
        if record.kind == "query":
            frontend = self.analytics.frontend if self.analytics is not None else None
            return QueryJob(record, self.environment, frontend)
        return TrainingJob(record, self.environment)

    def stop(self) -> None:
        """Stop serving (safe from signal handlers); running jobs resume at the next start."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`."""
        extra = [self.jobs.register]
        if self.analytics is not None:
            extra.append(self.analytics.register)
        server, health, self.port = await start_grpc_server(self.service, self.config.listen, extra)
        revocations = asyncio.create_task(
            watch_revocations(
                self.service.authenticator, self.registry, self.config.limits.enrollment_poll
            )
        )
        scheduler = asyncio.create_task(self.scheduler.run())
        self.ready.set()
        log.info(
            "standing network up on port %d: %d job(s) queued, state in %s",
            self.port,
            len(self.store.queued()),
            self.settings.state_dir,
        )
        try:
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({scheduler, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if scheduler in done:
                scheduler.result()  # a scheduler failure is the network's
        finally:
            for task in (scheduler, revocations):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.service.accepting = False
            with contextlib.suppress(Exception):
                await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            # No Shutdown: workers keep reconnecting to the next start of the network.
            for session in self.registry.sessions():
                session.send(None)
            await server.stop(self.config.limits.shutdown_grace)
            self.store.close()
