"""A training job's life, read top-down (as ``server/engine/sync.py`` is a round's).

Every federation is a job on a network (:mod:`..network`): on a standing network
(``fed-server --serve``) its scheduler runs the jobs data scientists submit with ``fed-job``;
a one-shot ``fed-server --rounds N ...`` is one job, from its flags, on a network of its own
(:mod:`..coordinator`). Both run this code:

1. **settings** (:func:`job_start`): the job's config (a submitted job's
   :func:`~.spec.job_config`: the network's process settings, the job's own), its strategy
   (:func:`~.strategy.prepare_strategy`), its initial model and the trainable part of it;
2. **resume** (:meth:`TrainingJob.prepare`): the checkpoint (a submitted job's is
   ``STATE_DIR/jobs/<id>/checkpoint``, always resumed; a one-shot's is ``--checkpoint-dir``,
   resumed with ``--resume``) holds its last completed round; a job the coordinator was
   killed under continues after it, so no round is lost or run twice;
3. **workers**: wait until ``min_workers`` of the job's workers (:class:`~.workers.JobWorkers`:
   tags, capabilities, not refused) are idle, at most ``--join-timeout``; other jobs hold
   theirs meanwhile;
4. **rounds**: the round engine the strategy asks for (:class:`~..engine.sync.SyncEngine`, or
   :class:`~..engine.fedbuff.FedBuffEngine` for ``async_settings``) over a
   :class:`~..engine.context.RoundContext`; each completed round goes to the job's sinks (on
   a standing network a line of the job's log) once it is checkpointed; workers that answer
   "awaiting approval" put the job in ``awaiting-approval`` until their owners decide
   (:mod:`.approval`);
5. **end** (:meth:`TrainingJob._finish`): on a standing network the final model and its
   metrics go to the job's folder (``fed-job pull`` reads them when every silo's release
   policy allows), each worker gets a ``JobEnd`` (it stays for the next job) and the audit
   log records what ran; a one-shot network then tells its workers the federation is over.

A stop (``fed-job stop``) ends the job at the next round boundary. Cancelling :meth:`run`
(the coordinator stopping) leaves the job ``running`` in the store: the next start resumes it,
synchronous and asynchronous (FedBuff) jobs alike, and its bytes count on from what its
recorded rounds moved (the store adds each round's with its row).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from fedcore.errors import CheckpointError, FedcoreError, RoundFailedError
from fedcore.frozen import split_weights, trainable_names
from fedcore.models import build_model, get_weights
from fedcore.plans.format import read_plan_file
from fedcore.privacy import DifferentialPrivacy
from fedcore.strategy import Strategy
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, signature_of

from ..engine.context import RoundContext
from ..engine.evaluation import central_evaluator
from ..engine.fedbuff import FedBuffEngine
from ..engine.reports import ReportPipeline
from ..engine.sync import SyncEngine
from ..plans import prepare_plan
from ..reporting.metrics import CoordinatorStatus, RoundMetrics, save_weights
from ..reporting.roster import connected_workers, format_roster
from ..reporting.sink import Sink
from ..state.checkpoint import Checkpointer
from ..state.config import Recovery, ServerConfig
from ..state.noise_check import check_noise_scale
from ..state.registry import WorkerPool, WorkerRegistry
from ..transport.service import CoordinatorService
from ..transport.traffic import Traffic
from .approval import ApprovalWatch
from .release import release_terms
from .spec import job_config
from .store import JobRecord, JobStore
from .strategy import prepare_strategy
from .workers import JobWorkers

__all__ = [
    "AuditTrail",
    "JobEnvironment",
    "JobStart",
    "NoAudit",
    "TrainingJob",
    "job_folder",
    "job_start",
]

log = logging.getLogger("fedcore.server")


def job_folder(root: Path, job_id: str) -> Path:
    """Where job ``job_id`` keeps its checkpoint, plan, final model and metrics."""
    return root / "jobs" / job_id


class AuditTrail(Protocol):
    """Where a network records what its jobs did (:class:`fedcore.auditlog.AuditLog`)."""

    def append(self, event: str, **fields: Any) -> object: ...


class NoAudit:
    """A one-shot network's audit trail: none (its log and metrics are the record)."""

    def append(self, event: str, **fields: Any) -> None:
        return None


@dataclass(frozen=True)
class JobEnvironment:
    """What a job uses of the network it runs on."""

    config: ServerConfig
    service: CoordinatorService
    registry: WorkerRegistry
    store: JobStore
    audit: AuditTrail
    #: The standing network's state folder (jobs' checkpoints, plans, models); None on a
    #: one-shot network, whose job writes only what its flags ask for.
    state_dir: Path | None

    @property
    def standing(self) -> bool:
        """Whether this is a standing network (jobs come and go; workers stay)."""
        return self.state_dir is not None


@dataclass(frozen=True)
class JobStart:
    """A job's settings made real (phase 1): its config, strategy and initial model."""

    config: ServerConfig
    strategy: Strategy
    #: The whole initial model, in the model's order.
    weights: Weights
    #: The names of the parameters rounds train (the rest is frozen).
    trainable: list[str]
    signature: ModelSignature


def job_start(config: ServerConfig, strategy: Strategy | None = None) -> JobStart:
    """Phase 1: the strategy (``config.strategy`` unless given), the initial model, and the
    check that DP noise is not below the model's own scale.

    Raises:
        FedcoreError: settings ``fed-server`` refuses (ConfigError, ModelError...).
    """
    chosen = prepare_strategy(config, strategy)
    model = build_model(config.model, seed=config.seed)
    # Shared, not copied: the model is dropped right away, so a large model costs 1x here.
    weights: Weights = get_weights(model, copy=False)
    trainable = trainable_names(model, config.trainable) if config.trainable else list(weights)
    del model
    if isinstance(chosen, DifferentialPrivacy) and chosen.noise_multiplier:
        check_noise_scale(
            noise_multiplier=chosen.noise_multiplier,
            clip_norm=chosen.clip_norm,
            # A round aggregates at least this many updates: the noise is at most this.
            min_updates=max(chosen.min_updates, config.results_needed),
            # Noise goes into what rounds train: the trainable part.
            weights=split_weights(weights, trainable)[0],
        )
    return JobStart(config, chosen, weights, trainable, signature_of(weights))


class _JobLog:
    """A standing network job's :class:`~..reporting.sink.Sink`: rounds into the job store."""

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
            bytes_sent=metrics.bytes_sent,
            bytes_received=metrics.bytes_received,
        )
        # Rounds complete: whatever the job waited for (approval) is over.
        self._store.set_running(self._job_id, f"round {metrics.round} of {self._rounds} completed")

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        return None


class TrainingJob:
    """One training job; ``await job.run()`` runs it to its end (or until cancelled).

    Args:
        record: the job as stored.
        env: the network it runs on.
        sinks: where its rounds go (the job's own list: sinks added to it before the first
            round report get every round); a standing network's job adds its log.
    """

    def __init__(
        self, record: JobRecord, env: JobEnvironment, sinks: list[Sink] | None = None
    ) -> None:
        self.record = record
        self.env = env
        self.sinks: list[Sink] = [] if sinks is None else sinks
        self._stop_requested = record.stop_requested
        #: Set by :meth:`prepare`: its reports, its rounds' context. (The JobStart is not
        #: kept: it holds the initial model, a whole model the rounds have replaced.)
        self.reports: ReportPipeline | None = None
        self.context: RoundContext | None = None
        self._workers: JobWorkers | None = None
        #: What the job is doing (for progress displays).
        self.phase = "waiting for workers"
        #: The first round to run: 1, or the one after a resumed checkpoint's.
        self.first_round = 1
        #: Why the job failed (None: it did not); a one-shot federation raises it.
        self.failure: FedcoreError | OSError | None = None

    @property
    def folder(self) -> Path | None:
        """The job's folder on a standing network (None on a one-shot network)."""
        if self.env.state_dir is None:
            return None
        return job_folder(self.env.state_dir, self.record.id)

    def stopping(self) -> bool:
        """Whether a stop was asked for (read anew: a stop arrives while the job awaits)."""
        return self._stop_requested

    def stop(self) -> None:
        """End the job at the next round boundary (now, while it waits for workers)."""
        self._stop_requested = True
        if self._workers is not None:
            self._workers.stopped.set()
        if self.reports is not None:
            self.reports.end_requested = True

    def _note(self, text: str, state: str = "running") -> None:
        self.env.store.set_state(self.record.id, state, text)
        self.env.store.log(self.record.id, text)

    # ------------------------------------------------------------------ settings

    def submitted_config(self) -> ServerConfig:
        """A submitted job's config: the network's process settings, the job's own, its
        plan file and its checkpoint folder (always resumed)."""
        folder = self.folder
        assert folder is not None, "a one-shot network's job is given its config"
        plan = None
        plan_path = folder / "plan.bin"
        if plan_path.exists():
            plan = prepare_plan(
                read_plan_file(plan_path, max_bytes=self.env.config.limits.max_model_bytes)
            )
        config = job_config(self.env.config, self.record.settings, self.record.id, plan)
        return replace(config, recovery=Recovery(folder / "checkpoint", resume=True))

    def prepare(self, start: JobStart) -> None:
        """Phase 2: resume from the checkpoint, and build the job's reports and round context.

        Raises:
            CheckpointError: a checkpoint of another model or federation.
        """
        config, strategy = start.config, start.strategy
        checkpointer = self._checkpointer(config, strategy)
        weights, restored, done = start.weights, list[RoundMetrics](), 0
        if checkpointer is not None and config.recovery.resume:
            weights, restored, done = self._resume(checkpointer, start)
        if self.env.standing:
            self.sinks.append(_JobLog(self.env.store, self.record.id, config.rounds))
        reports = ReportPipeline(
            strategy, central_evaluator(config), self.sinks, checkpointer, restored
        )
        reports.end_requested = self._stop_requested
        if done:
            reports.durable = weights  # the checkpoint's model is on disk already
        # Rounds (strategies, secure aggregation, DP, compression) see the trainable part only.
        rounds_see, frozen = split_weights(weights, start.trainable)
        if frozen:
            log.info(
                "%d of %d parameter tensors are frozen (%.1f MB, sent once per worker); "
                "rounds move %.1f MB",
                len(frozen),
                len(weights),
                sum(a.nbytes for a in frozen.values()) / 1e6,
                sum(a.nbytes for a in rounds_see.values()) / 1e6,
            )
        # A standing network's job judges its share of the workers (tags, capabilities,
        # refusals); a one-shot network's registry holds only the job's workers already (its
        # hello checks the model and secure aggregation, its registry the tags).
        workers = (
            JobWorkers(
                self.env.registry,
                tags=config.require_tags,
                secagg=config.secagg is not None,
                model=config.model.name,
                job_id=self.record.id,
            )
            if self.env.standing
            else None
        )
        if workers is not None and self._stop_requested:
            workers.stopped.set()
        context = RoundContext(
            config,
            strategy,
            rounds_see,
            self.env.service,
            reports,
            frozen=frozen,
            model_order=list(weights),
            workers=workers,
            # A one-shot federation's tasks carry no job: its workers see none.
            job_id=self.record.id if self.env.standing else "",
            scientist=self.record.scientist if self.env.standing else "",
            study=self.record.study if self.env.standing else "",
        )
        context.rounds_completed = done
        self.first_round = done + 1
        self.reports, self.context, self._workers = reports, context, workers

    def _checkpointer(self, config: ServerConfig, strategy: Strategy) -> Checkpointer | None:
        directory = config.recovery.checkpoint_dir
        if directory is None:
            return None
        fingerprint = {"model": repr(config.model), "strategy": config.strategy}
        if self.env.standing:
            fingerprint["job"] = self.record.id
        return Checkpointer(directory, fingerprint, {"strategy": strategy})

    def _resume(
        self, checkpointer: Checkpointer, start: JobStart
    ) -> tuple[Weights, list[RoundMetrics], int]:
        """The checkpoint's model, rows and round (restoring the strategy's state), or the
        initial model, no rows and round 0 when there is no checkpoint yet."""
        directory = checkpointer.directory
        checkpoint = checkpointer.load()
        if checkpoint is None:
            log.info("no checkpoint in %s yet: starting from round 1", directory)
            return start.weights, [], 0
        # safetensors sorts tensor names: compare as sets, then restore the model's order.
        if set(signature_of(checkpoint.weights)) != set(start.signature):
            raise CheckpointError(f"the checkpoint in {directory} holds weights of another shape")
        checkpointer.restore(checkpoint.states)
        rows = [RoundMetrics(**row) for row in checkpoint.metrics]
        if self.env.standing:
            # Rounds checkpointed after the store last heard of them (a kill in between):
            # logged now, once; the store then agrees with the checkpoint.
            for row in rows[self.record.rounds_done :]:
                self.env.store.record_round(
                    self.record.id,
                    row.round,
                    f"round {row.round} completed",
                    json.dumps(row.to_json()),
                    bytes_sent=row.bytes_sent,
                    bytes_received=row.bytes_received,
                )
            self._note(f"resuming after round {checkpoint.round} (its checkpoint)")
        log.info(
            "resuming from the checkpoint of round %d in %s",
            checkpoint.round,
            directory,
            extra={"event": "resumed", "round": checkpoint.round},
        )
        weights = {spec.name: checkpoint.weights[spec.name] for spec in start.signature}
        return weights, rows, checkpoint.round

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Run the job; its final state is in the store (and a failure in :attr:`failure`)
        when this returns."""
        if self.context is None:
            try:
                self.prepare(job_start(self.submitted_config()))
            except (FedcoreError, OSError) as exc:  # ConfigError, ModelError, PlanError...
                self._finish("failed", f"invalid job: {exc}", exc)
                return
        if self.env.standing:
            # Its messages' bytes, to its end, on from what its rounds moved before a restart
            # (prepare recorded the rounds the checkpoint holds).
            record = self.env.store.get(self.record.id)
            self.env.service.counters.open(
                self.record.id, Traffic(record.bytes_sent, record.bytes_received)
            )
        context, reports = self.context, self.reports
        assert context is not None, "prepared above"
        assert reports is not None, "prepared above"
        config = context.config
        approvals = ApprovalWatch(config.limits.approval_timeout, self._note)
        context.on_awaiting = approvals.awaiting
        try:
            if context.rounds_completed >= config.rounds:
                log.info("the checkpoint already holds all %d rounds", config.rounds)
            elif await self._wait_for_workers(context.registry, config):
                await self._rounds(context, reports, approvals)
            await reports.drain()
        except asyncio.CancelledError:
            raise  # the coordinator is stopping: the job stays `running` and resumes later
        except (FedcoreError, OSError) as exc:
            self._finish("failed", str(exc), exc)
            return
        done = context.rounds_completed
        if approvals.denied:
            self._finish("denied", approvals.denied)
        elif self.stopping():
            self._finish("stopped", f"stopped after round {done}")
        else:
            self._finish("completed", f"completed {done} round(s)")

    async def _wait_for_workers(self, workers: WorkerPool, config: ServerConfig) -> bool:
        """Wait until ``min_workers`` of the job's workers are idle; False when stopped.

        Raises:
            RoundFailedError: too few joined within ``--join-timeout``.
        """
        tags = " ".join("#" + t for t in config.require_tags)
        tagged = f" tagged {tags}" if tags else ""
        self._note(f"waiting for {config.min_workers} worker(s){tagged}")
        timeout = config.limits.join_timeout
        if not await workers.wait_for_idle(config.min_workers, timeout):
            if self.stopping():
                return False
            raise RoundFailedError(
                f"only {len(workers.idle())} of {config.min_workers} workers{tagged} joined "
                f"within {timeout:g} s; start more workers or lower --min-workers"
            )
        log.info(
            "%s",
            format_roster(connected_workers(self.env.registry.sessions()), config.require_tags),
        )
        return True

    async def _rounds(
        self, context: RoundContext, reports: ReportPipeline, approvals: ApprovalWatch
    ) -> None:
        """Phase 4: the round engine the strategy asks for, from the first round not done."""
        first = context.rounds_completed + 1
        self._note(f"running rounds {first}-{context.config.rounds}")
        self.env.audit.append("ran", job=self.record.id, study=self.record.study, first=first)
        reports.start_clock()
        self.phase = "training"
        settings = context.strategy.async_settings
        try:
            if settings is not None:
                await FedBuffEngine(context, settings).run()
            else:
                await SyncEngine(context).run(first)
        except RoundFailedError as exc:
            # Stopped while the round waited for workers: not a failure. On a standing
            # network a round the owners stopped (a denial, no decision in time) ends the job
            # as denied; a one-shot federation fails with it, as on any failed round.
            if self.stopping():
                return
            if not self.env.standing or approvals.verdict(exc) == "failed":
                raise

    def _finish(
        self, state: str, message: str, failure: FedcoreError | OSError | None = None
    ) -> None:
        """Record the job's end: on a standing network its model and metrics, its state, the
        audit entry and JobEnd to its workers."""
        self.failure = failure
        job_id, store = self.record.id, self.env.store
        store.set_state(job_id, state, message)
        store.log(job_id, f"{state}: {message}")
        if not self.env.standing:
            return  # the one-shot network reports, saves and tells its workers itself
        self.env.service.counters.close(job_id)
        # The job's bytes are its rounds' (each added as it was recorded, across restarts):
        # what no round used (results in flight at its end or at a kill) is in no row.
        record = store.get(job_id)
        traffic = Traffic(record.bytes_sent, record.bytes_received)
        context, reports, folder = self.context, self.reports, self.folder
        assert folder is not None
        epsilon: float | None = None
        if context is not None and reports is not None and self._workers is not None:
            rows = [r.to_json() for r in reports.rows]
            if rows:
                save_weights(
                    reports.exportable(context.model_weights(context.weights)),
                    folder / "model.safetensors",
                    {"job": job_id, "rounds": str(len(rows))},
                )
            # A job that ended before its first checkpoint (denied, stopped) has no folder yet.
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.json").write_text(json.dumps(rows))
            epsilon = reports.rows[-1].epsilon if reports.rows else None
            release = release_terms(self._workers.released, private=context.config.dp is not None)
            store.set_result(
                job_id,
                json.dumps({"rows": len(rows), "release": release, "bytes": traffic.to_json()}),
            )
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
