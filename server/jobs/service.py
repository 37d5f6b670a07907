"""The ``fedcore.v1.Jobs`` gRPC service: data scientists submit and follow their jobs.

Every call carries a data scientist's token (``x-fedcore-token``), checked against the
scientists' enrollment (``fed-server --scientists``); the entry's studies
(``fed-certs add-scientist --study``) are all the scientist may see: another study's job is
NOT_FOUND, exactly like a job that does not exist, so ids cannot be probed. Every submission,
stop and release goes to the coordinator's audit log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedcore.auditlog import AuditLog
from fedcore.enrollment import Enrollment
from fedcore.errors import ConfigError
from fedcore.plans.format import plan_hash
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.v1 import fedcore_pb2_grpc

from ..transport.scientists import Context, abort, identify_scientist
from ..transport.traffic import Traffic, TrafficCounters
from .job import job_folder
from .release import release_refusal
from .scheduler import Scheduler
from .spec import check_query, rounds_of
from .store import JobRecord, JobStore

__all__ = ["JobsService", "job_info"]

log = logging.getLogger("fedcore.server")


_PULL_CHUNK = 1 << 20
#: How often ``logs --follow`` looks for new lines (they are rows in the job store).
_FOLLOW_POLL = 0.2


@dataclass(frozen=True)
class Scientist:
    name: str
    studies: frozenset[str]


def job_info(record: JobRecord, live: Traffic | None = None) -> pb.JobInfo:
    """``record`` for its scientist; ``live``: the running job's bytes so far (an ended job's
    are in its result)."""
    traffic = live if live is not None else _final_traffic(record)
    return pb.JobInfo(
        job_id=record.id,
        study=record.study,
        scientist=record.scientist,
        kind=record.kind,
        state=record.state,
        message=record.message,
        rounds_done=record.rounds_done,
        rounds=record.rounds,
        created=record.created,
        settings_json=json.dumps(record.settings),
        result_json=record.result,
        bytes_sent=traffic.bytes_sent,
        bytes_received=traffic.bytes_received,
    )


def _final_traffic(record: JobRecord) -> Traffic:
    """An ended job's bytes (its result's); a job not running now (queued again after a
    restart), what its recorded rounds moved."""
    try:
        counted = json.loads(record.result or "{}").get("bytes")
        if counted is None:
            return Traffic(record.bytes_sent, record.bytes_received)
        return Traffic(int(counted.get("sent", 0)), int(counted.get("received", 0)))
    except (ValueError, TypeError, AttributeError):
        return Traffic()


class JobsService(fedcore_pb2_grpc.JobsServicer):
    """Submit, List, Status, Logs, Stop and Pull for enrolled data scientists."""

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        scientists: Enrollment,
        audit: AuditLog,
        state_dir: Path,
        max_plan_bytes: int,
        check_training: Callable[[dict[str, Any]], object],
        counters: TrafficCounters | None = None,
    ) -> None:
        """``check_training``: raises ConfigError for a training job's settings the network
        would refuse to run (checked at submission, so a bad job never waits in the queue).
        ``counters``: the workers' streams' bytes, whose running jobs' counts status shows."""
        self.store = store
        self.scheduler = scheduler
        self.scientists = scientists
        self.audit = audit
        self.state_dir = state_dir
        self.max_plan_bytes = max_plan_bytes
        self.check_training = check_training
        self.counters = counters or TrafficCounters()

    def _info(self, record: JobRecord) -> pb.JobInfo:
        return job_info(record, None if record.final else self.counters.of_job(record.id))

    def register(self, server: grpc.aio.Server) -> None:
        fedcore_pb2_grpc.add_JobsServicer_to_server(self, server)

    async def _who(self, context: Context) -> Scientist:
        name, entry = await identify_scientist(
            context, self.scientists, "`fed-certs add-scientist --study STUDY`"
        )
        return Scientist(name, frozenset(entry.studies))

    async def _job(self, job_id: str, who: Scientist, context: Context) -> JobRecord:
        try:
            record = self.store.get(job_id)
        except KeyError:
            record = None
        if record is None or record.study not in who.studies:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no job {job_id!r} in your studies")
        return record

    async def Submit(self, request: pb.JobSubmit, context: Context) -> pb.JobInfo:
        who = await self._who(context)
        if request.study not in who.studies:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.name} is not in study {request.study!r} (their studies: "
                f"{', '.join(sorted(who.studies)) or 'none'}; fed-certs add-scientist --study)",
            )
        try:
            settings = json.loads(request.settings_json or "{}")
            if not isinstance(settings, dict):
                raise ConfigError("the job's settings must be a JSON object")
            if request.kind == "query":
                check_query(settings)
                rounds = 0
            elif request.kind == "train":
                if not request.plan_file:  # a plan's model exists once the plan is verified
                    self.check_training(settings)
                rounds = rounds_of(settings)
            else:
                raise ConfigError(f"a job's kind is 'train' or 'query', not {request.kind!r}")
            if len(request.plan_file) > self.max_plan_bytes:
                raise ConfigError("the plan file is larger than the network's --max-model-bytes")
            plan = _plan_hash(request.plan_file) if request.plan_file else None
        except (ConfigError, ValueError, TypeError) as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        record = self.store.submit(
            study=request.study,
            scientist=who.name,
            kind=request.kind,
            settings=settings,
            rounds=rounds,
        )
        if request.plan_file:
            # Verified when the job runs, as fed-server --plan verifies it; never imported.
            folder = job_folder(self.state_dir, record.id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "plan.bin").write_bytes(request.plan_file)
        self.audit.append(
            "submitted",
            job=record.id,
            kind=record.kind,
            study=record.study,
            scientist=who.name,
            settings=settings,
            plan=plan,
        )
        log.info("job %s submitted by %r in study %r", record.id, who.name, record.study)
        self.scheduler.wake()
        return self._info(record)

    async def List(self, request: pb.JobListRequest, context: Context) -> pb.JobList:
        who = await self._who(context)
        return pb.JobList(jobs=[self._info(r) for r in self.store.all(who.studies)])

    async def Status(self, request: pb.JobRef, context: Context) -> pb.JobInfo:
        who = await self._who(context)
        return self._info(await self._job(request.job_id, who, context))

    async def Logs(
        self, request: pb.JobLogsRequest, context: Context
    ) -> AsyncIterator[pb.JobEvent]:
        who = await self._who(context)
        record = await self._job(request.job_id, who, context)
        after = request.after
        while True:
            for line in self.store.events(record.id, after):
                after = line.seq
                yield pb.JobEvent(
                    seq=line.seq, time=line.time, text=line.text, metrics_json=line.metrics
                )
            if not request.follow or self.store.get(record.id).final:
                if not self.store.events(record.id, after):
                    return
                continue
            await asyncio.sleep(_FOLLOW_POLL)

    async def Stop(self, request: pb.JobRef, context: Context) -> pb.JobInfo:
        who = await self._who(context)
        record = await self._job(request.job_id, who, context)
        return self._info(self.request_stop(record.id, who.name))

    def request_stop(self, job_id: str, scientist: str) -> JobRecord:
        """Stop job ``job_id`` for ``scientist`` (already allowed to), audited; also the
        network console's stop. A job that is over is left as it is."""
        record = self.store.get(job_id)
        if not record.final:
            self.audit.append("stop-requested", job=record.id, scientist=scientist)
            self.store.log(record.id, f"stop requested by {scientist}")
            self.scheduler.stop(record.id)
        return self.store.get(record.id)

    async def Pull(self, request: pb.JobRef, context: Context) -> AsyncIterator[pb.JobModelChunk]:
        who = await self._who(context)
        record = await self._job(request.job_id, who, context)
        folder = job_folder(self.state_dir, record.id)
        model = folder / "model.safetensors"
        if record.kind != "train" or not record.final or not model.exists():
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {record.id} has no model to pull (it is {record.state})",
            )
        result = json.loads(record.result or "{}")
        refusal = release_refusal(result.get("release", {}))
        if refusal is not None:
            self.audit.append("release-refused", job=record.id, scientist=who.name, reason=refusal)
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, refusal)
        data = model.read_bytes()
        self.audit.append(
            "released", job=record.id, scientist=who.name, bytes=len(data), study=record.study
        )
        metrics = (folder / "metrics.json").read_text()
        for start in range(0, max(len(data), 1), _PULL_CHUNK):
            yield pb.JobModelChunk(
                data=data[start : start + _PULL_CHUNK], metrics_json=metrics if start == 0 else ""
            )


def _plan_hash(data: bytes) -> str:
    """The hash of the plan in a plan file's bytes (a protobuf PlanFile, nothing pickled)."""
    try:
        program = pb.PlanFile.FromString(data).program
    except DecodeError:
        raise ConfigError("the plan file is not a fed-plan export (PlanFile)") from None
    return plan_hash(program)
