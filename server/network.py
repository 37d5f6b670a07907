"""A network: the long-lived part of a coordinator, which jobs run on.

:class:`Network` holds what outlives jobs: the gRPC server, the workers' registry and their
Join service, authentication and revocation, the Analytics service, the job store and the
audit log. Each job's life is :mod:`.jobs.job` (training) or :mod:`.jobs.query` (an analytics
query). A network is either

* **standing** (``fed-server --serve``, :attr:`NetworkSettings.state_dir` set): workers join
  once and stay; data scientists submit jobs to its Jobs service; its
  :class:`~.jobs.scheduler.Scheduler` runs them, the store (SQLite, ``jobs.db``) keeps them.
  Stopping it (SIGINT/SIGTERM, or a crash) tells workers nothing: they keep reconnecting, and
  the next start resumes the jobs that were running;
* **one-shot** (``fed-server --rounds N ...``, no state folder): a network of its own for one
  job, the flags' (:mod:`.coordinator`). It admits only workers with that job's model, keeps
  its store in memory, and at the end tells its workers why the federation is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2

from fedcore.auditlog import AuditLog
from fedcore.enrollment import Enrollment
from fedcore.errors import ConfigError
from fedcore.flags import setting
from fedcore.plan import ModelSpec
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature

from .analytics.hook import serve_analytics
from .jobs.job import AuditTrail, JobEnvironment, NoAudit, TrainingJob
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

#: The health services a network reports on.
_HEALTH = ("", "fedcore.v1.Coordinator")


@dataclass(frozen=True)
class NetworkSettings:
    """What only a standing network has (``fed-server --serve ...``).

    Args:
        state_dir: the job store, the jobs' checkpoints and models, the audit log; None: a
            one-shot network (one job, from ``fed-server``'s flags).
        max_running: jobs run at once (a worker takes one training task at a time unless its
            owner's ``[jobs] max-tasks`` allows more).

    How long a job waits for its silos' owners to decide is the process's
    ``--approval-timeout`` (``Limits.approval_timeout``), as for a one-shot federation.
    """

    state_dir: Path | None = setting(
        None,
        "the network's job store (jobs.db), jobs' checkpoints and models, audit log",
    )
    max_running: int = setting(1, "jobs run at once", flag="--max-running-jobs")

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ConfigError("--max-running-jobs must be at least 1")


class Network:
    """Serves workers (and on a standing network data scientists) and runs jobs.

    Args:
        config: the process settings (a one-shot network's are its job's too).
        settings: standing or one-shot.
        model: a one-shot network's model and its signature: workers with another are refused
            at their hello; None on a standing network, where each job judges its workers.
    """

    def __init__(
        self,
        config: ServerConfig,
        settings: NetworkSettings,
        model: tuple[ModelSpec, ModelSignature] | None = None,
    ) -> None:
        state_dir = settings.state_dir
        if state_dir is not None and config.analytics is None:
            raise ConfigError(
                "--serve needs --scientists: a standing network's jobs are submitted by "
                "enrolled data scientists (fed-certs add-scientist --study STUDY)"
            )
        self.config = config
        self.settings = settings
        if config.output.threads:
            torch.set_num_threads(config.output.threads)
        # A standing network's tags are judged per job (jobs/workers.py); a one-shot network
        # lists the workers without its tags as connected but not selectable.
        self.registry = WorkerRegistry(config.require_tags if state_dir is None else ())
        authenticator = Authenticator(
            Enrollment(config.security.enrolled) if config.security.enrolled is not None else None,
            mutual_tls=config.security.tls is not None and config.security.tls.mutual,
        )
        spec, signature = model if model is not None else (None, ())
        self.service = CoordinatorService(config, self.registry, spec, signature, authenticator)
        # Federated analytics (server/analytics): its own service beside Join.
        self.analytics = serve_analytics(config.analytics, self.registry, self.service)
        audit: AuditTrail = NoAudit()
        audit_log: AuditLog | None = None
        if state_dir is None:
            self.store = JobStore(Path(":memory:"))  # the one job lives as long as the process
        else:
            self.store = JobStore(state_dir / "jobs.db")
            audit = audit_log = AuditLog(state_dir / "audit.log")
            for record in self.store.recover():
                log.info(
                    "job %s was running when the coordinator stopped: it resumes",
                    record.id,
                    extra={"event": "job_resumed", "job": record.id},
                )
                audit.append("resumed", job=record.id, rounds_done=record.rounds_done)
        self.environment = JobEnvironment(
            config, self.service, self.registry, self.store, audit, state_dir
        )
        self.scheduler = Scheduler(self.store, self._make_job, settings.max_running)
        self.jobs: JobsService | None = None
        if state_dir is not None and audit_log is not None and config.analytics is not None:
            self.jobs = JobsService(
                self.store,
                self.scheduler,
                Enrollment(config.analytics.scientists, section="scientists"),
                audit_log,
                state_dir,
                config.limits.max_model_bytes,
                lambda job: job_config(config, job, "submitted"),
                counters=self.service.counters,
            )
        self.port: int | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        #: What :meth:`serving` tells the workers when it ends: why the federation is over
        #: (a ``Shutdown``: they exit), or None: nothing, so they keep reconnecting.
        self.farewell: str | None = None
        #: Awaited when serving ends, before the job store closes (a console reading it stops).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    def _make_job(self, record: JobRecord) -> RunnableJob:
        if record.kind == "query":
            frontend = self.analytics.frontend if self.analytics is not None else None
            return QueryJob(record, self.environment, frontend)
        return TrainingJob(record, self.environment)

    def stop(self) -> None:
        """Stop serving (safe from signal handlers); running jobs resume at the next start."""
        self._stop.set()

    async def stopped(self) -> None:
        """Return once :meth:`stop` was called."""
        await self._stop.wait()

    async def run(self) -> None:
        """Serve until :meth:`stop`, running the queued jobs (a standing network's)."""
        async with self.serving():
            scheduler = asyncio.create_task(self.scheduler.run())
            log.info(
                "standing network up on port %d: %d job(s) queued, state in %s",
                self.port,
                len(self.store.queued()),
                self.settings.state_dir,
            )
            try:
                stopper = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait(
                    {scheduler, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                if scheduler in done:
                    scheduler.result()  # a scheduler failure is the network's
            finally:
                for task in (scheduler, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Serve workers (and data scientists) inside the block; the port is its value.
        Leaving it stops serving and tells the workers :attr:`farewell`."""
        extra = [self.jobs.register] if self.jobs is not None else []
        if self.analytics is not None:
            extra.append(self.analytics.register)
        server, health, self.port = await start_grpc_server(self.service, self.config.listen, extra)
        log.debug("listening on %s:%d", self.config.listen.rsplit(":", 1)[0], self.port)
        revocations = asyncio.create_task(
            watch_revocations(
                self.service.authenticator, self.registry, self.config.limits.enrollment_poll
            )
        )
        self.ready.set()
        try:
            yield self.port
        finally:
            revocations.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await revocations
            self.service.accepting = False
            with contextlib.suppress(Exception):
                for name in _HEALTH:
                    await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await self._say_goodbye(self.farewell)
            await server.stop(self.config.limits.shutdown_grace)
            for close in self.on_close:
                await close()
            self.store.close()

    async def _say_goodbye(self, reason: str | None) -> None:
        """End every worker's stream: with a ``Shutdown`` saying ``reason`` (the worker exits),
        or, None, without one (it reconnects to the next start)."""
        sessions = self.registry.sessions()
        for session in sessions:
            if reason is not None:
                session.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason=reason)))
            session.send(None)
        if sessions:
            await asyncio.wait(
                [asyncio.create_task(s.closed.wait()) for s in sessions],
                timeout=self.config.limits.shutdown_grace,
            )
