"""A job's life on a standing network, read top-down (as ``server/engine/sync.py`` is a round's).

:meth:`TrainingJob.run`:

1. **settings**: the job's :func:`~.spec.job_config` (the network's process settings, the
   job's own), its strategy (:func:`~..coordinator.prepare_strategy`), its initial model;
2. **resume**: the job's checkpoint folder (``STATE_DIR/jobs/<id>/checkpoint``) holds its
   last completed round; a job the coordinator was killed under continues after it, so no
   round is lost or run twice;
3. **workers**: wait until ``min_workers`` of the job's workers (:class:`~.workers.JobWorkers`:
   tags, capabilities, not refused) are idle; the network's other jobs hold theirs meanwhile;
4. **rounds**: the round engine (:class:`~..engine.sync.SyncEngine`) over a
   :class:`~..engine.context.RoundContext` whose tasks carry the job's id; each completed
   round becomes a line of the job's log (with its metrics row) once it is checkpointed;
   workers that answer "awaiting approval" put the job in ``awaiting-approval`` until their
   owners decide (:mod:`.approval`);
5. **end**: the final model and its metrics go to the job's folder (``fed-job pull`` reads
   them when every silo's release policy allows), each worker gets a ``JobEnd`` (never a
   ``Shutdown``: it stays for the next job), the audit log records what ran.

A stop (``fed-job stop``) ends the job at the next round boundary. Cancelling :meth:`run`
(the coordinator stopping) leaves the job ``running`` in the store: the next start resumes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fedcore.auditlog import AuditLog
from fedcore.errors import CheckpointError, ConfigError, FedcoreError, RoundFailedError
from fedcore.models import build_model, get_weights
from fedcore.plans.format import read_plan_file
from fedcore.privacy import DifferentialPrivacy
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

from ..coordinator import prepare_strategy
from ..engine.context import RoundContext
from ..engine.evaluation import central_evaluator
from ..engine.reports import ReportPipeline
from ..engine.sync import SyncEngine
from ..plans import prepare_plan
from ..reporting.metrics import CoordinatorStatus, RoundMetrics, save_weights
from ..state.checkpoint import Checkpointer
from ..state.config import Recovery, ServerConfig
from ..state.noise_check import check_noise_scale
from ..state.registry import WorkerRegistry
from ..transport.service import CoordinatorService
from .approval import ApprovalWatch
from .release import release_terms
from .spec import job_config
from .store import JobRecord, JobStore
from .workers import JobWorkers

__all__ = ["JobEnvironment", "TrainingJob", "job_folder"]

log = logging.getLogger("fedcore.server")


def job_folder(root: Path, job_id: str) -> Path:
    """Where job ``job_id`` keeps its checkpoint, plan, final model and metrics."""
    return root / "jobs" / job_id


@dataclass(frozen=True)
class JobEnvironment:
    """What a job uses of the network it runs on."""

    config: ServerConfig
    service: CoordinatorService
    registry: WorkerRegistry
    store: JobStore
    audit: AuditLog
    state_dir: Path


class _JobLog:
    """The job's :class:`~..reporting.sink.Sink`: completed rounds into the job store."""

    def __init__(self, store: JobStore, job_id: str, rounds: int) -> None:
        self._store = store
        self._job_id = job_id
        self._rounds = rounds

    def update(self, status: CoordinatorStatus) -> None:
        return None

    def round_completed(self, metrics: RoundMetrics) -> None:
        row = metrics.to_json()
        loss = metrics.train.get("loss")
        self._store.record_round(
            self._job_id,
            metrics.round,
            f"round {metrics.round} completed: {metrics.workers} worker(s)"
            + (f", train loss {loss:.4f}" if loss is not None else ""),
            json.dumps(row),
        )
        # Rounds complete: whatever the job waited for (approval) is over.
        self._store.set_running(self._job_id, f"round {metrics.round} of {self._rounds} completed")

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        return None


class TrainingJob:
    """One training job; ``await job.run()`` runs it to its end (or until cancelled)."""

    def __init__(self, record: JobRecord, env: JobEnvironment) -> None:
        self.record = record
        self.env = env
        self.folder = job_folder(env.state_dir, record.id)
        self._stop_requested = record.stop_requested
        self._reports: ReportPipeline | None = None
        self._workers: JobWorkers | None = None

    def stopping(self) -> bool:
        """Whether a stop was asked for (read anew: a stop arrives while the job awaits)."""
        return self._stop_requested

    def stop(self) -> None:
        """End the job at the next round boundary (now, while it waits for workers)."""
        self._stop_requested = True
        if self._workers is not None:
            self._workers.stopped.set()
        if self._reports is not None:
            self._reports.end_requested = True

    def _note(self, text: str, state: str = "running") -> None:
        self.env.store.set_state(self.record.id, state, text)
        self.env.store.log(self.record.id, text)

    # ------------------------------------------------------------------ settings

    def _config(self) -> ServerConfig:
        plan = None
        plan_path = self.folder / "plan.bin"
        if plan_path.exists():
            plan = prepare_plan(
                read_plan_file(plan_path, max_bytes=self.env.config.limits.max_model_bytes)
            )
        config = job_config(self.env.config, self.record.settings, self.record.id, plan)
        return replace(config, recovery=Recovery(self.folder / "checkpoint", resume=True))

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Run the job; its final state is in the store when this returns."""
        job_id, store = self.record.id, self.env.store
        self.env.service.counters.open(job_id)  # its messages' bytes, from now to its end
        try:
            config = self._config()
            strategy = prepare_strategy(config, None)
            weights: Weights = get_weights(build_model(config.model, seed=config.seed), copy=False)
        except (FedcoreError, OSError) as exc:  # ConfigError, ModelError, PlanError...
            self._finish("failed", f"invalid job: {exc}")
            return
        if isinstance(strategy, DifferentialPrivacy) and strategy.noise_multiplier:
            try:
                check_noise_scale(
                    noise_multiplier=strategy.noise_multiplier,
                    clip_norm=strategy.clip_norm,
                    min_updates=max(strategy.min_updates, config.results_needed),
                    weights=weights,
                )
            except ConfigError as exc:
                self._finish("failed", f"invalid job: {exc}")
                return
        checkpointer = Checkpointer(
            self.folder / "checkpoint",
            {"model": repr(config.model), "strategy": config.strategy, "job": job_id},
            {"strategy": strategy},
        )
        try:
            weights, restored = self._resume(checkpointer, weights)
        except CheckpointError as exc:
            self._finish("failed", str(exc))
            return
        evaluator = central_evaluator(config)
        reports = ReportPipeline(
            strategy, evaluator, [_JobLog(store, job_id, config.rounds)], checkpointer, restored
        )
        self._reports = reports
        reports.end_requested = self._stop_requested
        if restored:
            reports.durable = weights
        workers = JobWorkers(
            self.env.registry,
            tags=config.require_tags,
            secagg=config.secagg is not None,
            model=config.model.name,
        )
        self._workers = workers
        if self._stop_requested:
            workers.stopped.set()
        context = RoundContext(
            config,
            strategy,
            weights,
            self.env.service,
            reports,
            workers=workers,
            job_id=job_id,
            scientist=self.record.scientist,
            study=self.record.study,
        )
        first = len(restored) + 1
        context.rounds_completed = first - 1
        approvals = ApprovalWatch(config.limits.approval_timeout, self._note)
        context.on_awaiting = approvals.awaiting
        try:
            if first > config.rounds:
                log.info(
                    "job %s: its checkpoint already holds all %d rounds", job_id, config.rounds
                )
            elif await self._wait_for_workers(workers, config):
                self._note(f"running rounds {first}-{config.rounds}")
                self.env.audit.append("ran", job=job_id, study=self.record.study, first=first)
                reports.start_clock()
                try:
                    await SyncEngine(context).run(context.rounds_completed + 1)
                except RoundFailedError as exc:
                    # Stopped while the round waited for workers: not a failure. A round the
                    # owners stopped (a denial, no decision in time) ends the job as denied.
                    if not self.stopping() and approvals.verdict(exc) == "failed":
                        raise
            await reports.drain()
        except asyncio.CancelledError:
            raise  # the coordinator is stopping: the job stays `running` and resumes later
        except (FedcoreError, OSError) as exc:
            self._finish("failed", str(exc), context, workers, reports)
            return
        if approvals.denied:
            self._finish("denied", approvals.denied, context, workers, reports)
        elif self.stopping():
            done = context.rounds_completed
            self._finish("stopped", f"stopped after round {done}", context, workers, reports)
        else:
            self._finish(
                "completed",
                f"completed {context.rounds_completed} round(s)",
                context,
                workers,
                reports,
            )

    def _resume(
        self, checkpointer: Checkpointer, weights: Weights
    ) -> tuple[Weights, list[RoundMetrics]]:
        """The checkpoint's model and rows, or ``weights`` and none on a first start."""
        checkpoint = checkpointer.load()
        if checkpoint is None:
            return weights, []
        signature = signature_of(weights)
        if set(signature_of(checkpoint.weights)) != set(signature):
            raise CheckpointError(f"the checkpoint of job {self.record.id} holds another model")
        checkpointer.restore(checkpoint.states)
        rows = [RoundMetrics(**row) for row in checkpoint.metrics]
        # Rounds checkpointed after the store last heard of them (a kill in between): logged
        # now, once; the store then agrees with the checkpoint.
        for row in rows[self.record.rounds_done :]:
            self.env.store.record_round(
                self.record.id, row.round, f"round {row.round} completed", json.dumps(row.to_json())
            )
        self._note(f"resuming after round {checkpoint.round} (its checkpoint)")
        return {spec.name: checkpoint.weights[spec.name] for spec in signature}, rows

    async def _wait_for_workers(self, workers: JobWorkers, config: ServerConfig) -> bool:
        """Wait until ``min_workers`` of the job's workers are idle; False when stopped."""
        tags = " ".join("#" + t for t in config.require_tags)
        self._note(f"waiting for {config.min_workers} worker(s){' tagged ' + tags if tags else ''}")
        return await workers.wait_for_idle(config.min_workers, None)

    def _finish(
        self,
        state: str,
        message: str,
        context: RoundContext | None = None,
        workers: JobWorkers | None = None,
        reports: ReportPipeline | None = None,
    ) -> None:
        """Record the job's end: its model and metrics, its state, JobEnd to its workers."""
        job_id, store = self.record.id, self.env.store
        traffic = self.env.service.counters.close(job_id)
        epsilon: float | None = None
        if context is not None and reports is not None:
            rows = [r.to_json() for r in reports.rows]
            model = reports.exportable(context.model_weights(context.weights))
            if rows:
                save_weights(
                    model,
                    self.folder / "model.safetensors",
                    {"job": job_id, "rounds": str(len(rows))},
                )
            # A job that ended before its first checkpoint (denied, stopped) has no folder yet.
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "metrics.json").write_text(json.dumps(rows))
            epsilon = reports.rows[-1].epsilon if reports.rows else None
            release = release_terms(
                workers.released if workers is not None else {},
                private=context.config.dp is not None,
            )
            store.set_result(
                job_id,
                json.dumps({"rows": len(rows), "release": release, "bytes": traffic.to_json()}),
            )
        store.set_state(job_id, state, message)
        store.log(job_id, f"{state}: {message}")
        self.env.audit.append(
            state,
            job=job_id,
            study=self.record.study,
            scientist=self.record.scientist,
            reason=message,
            rounds=context.rounds_completed if context is not None else 0,
            plan=context.config.plan.hash if context and context.config.plan else None,
            epsilon=epsilon,
        )
        end = pb.CoordinatorMessage(job_end=pb.JobEnd(job_id=job_id, reason=f"{state}: {message}"))
        for session in self.env.registry.sessions():
            session.send(end)
        log.info("job %s %s: %s", job_id, state, message)
