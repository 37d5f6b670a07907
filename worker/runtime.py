"""The worker runtime: connect, say hello, run the plans the coordinator streams, reconnect.

The session is an explicit state machine::

    DISCONNECTED ──▶ CONNECTING ──▶ READY ◀──▶ WORKING
         ▲               │            │           │
         └───────────────┴────────────┴───────────┘   (connection lost: back off, retry)
                                      │
                                      ▼
                                  FINISHED          (the coordinator said the federation is over)

Every task passes the worker's :class:`~.gate.Gate` the moment it arrives: a task that breaks
a rule (the model, its size, the training bounds, DP and secure-aggregation parameters, the
data owner's ``--policy``) is answered with ``ERROR_CODE_REFUSED`` and the rule it breaks
(also logged here), and nothing of it runs. The runtime only ever runs the
:class:`~.gate.CheckedTask` the gate returns, and every result passes the gate again on its
way out (the privacy charge, then what may be released).

Training runs in a thread so heartbeats keep flowing on the same stream; up to the owner's
``[jobs] max-tasks`` tasks of different jobs run at once, each in its own thread (one by
default). A task beyond that bound is refused (:class:`~.task_slots.TaskSlots`), whatever
the coordinator believes, and one task's result and its chunks leave together, never
interleaved with another's. A connection that
cannot be made, or breaks, is retried with exponential backoff and jitter; a refusal that a
retry cannot fix (wrong protocol version, wrong model, bad name) ends the worker with
:class:`~fedcore.errors.RejectedError`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import numpy as np

from fedcore.auditlog import AuditLog
from fedcore.buffer_pool import BufferPool
from fedcore.codec import (
    CHUNK_FIELD_IN_WORKER_MESSAGE,
    PayloadAssembler,
    RawChunk,
    encode_chunk_message,
    iter_chunk_views,
    make_header,
    signature_specs,
)
from fedcore.compression import EXTRA_KEY, Compressor, scheme_from_code
from fedcore.data.metadata import DatasetMetadata
from fedcore.enrollment import TOKEN_METADATA_KEY
from fedcore.errors import (
    AuthenticationError,
    AwaitingApproval,
    ConfigError,
    DataError,
    FedcoreError,
    IdentityMismatchError,
    ModelError,
    ModelMismatchError,
    PayloadError,
    RejectedError,
    SecAggError,
    TaskRefused,
    TrainingFailed,
)
from fedcore.flow_control import FLOW_CONTROL_OPTIONS
from fedcore.model_catalog import ModelCatalog
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import (
    DEFAULT_MAX_MODEL_BYTES,
    PROTOCOL_VERSION,
    SECAGG_CAPABILITY,
    check_protocol_version,
    max_message_bytes,
)
from fedcore.sanitize import printable
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.participation import ParticipationLog
from fedcore.secagg.wire import MASKED_TENSOR
from fedcore.tls import ClientTLS
from fedcore.units import format_bytes
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, total_bytes

from .analytics import ANALYTICS_CAPABILITY, QueryResponder
from .connection_errors import diagnose
from .frozen import FrozenStore
from .gate import CheckedTask, Gate
from .plans import PlanLibrary
from .policy import PolicyGuard
from .privacy import apply_client_dp
from .secagg import SecAggRounds
from .stream import JoinStream
from .task_slots import TaskSlots
from .trainer import FitOutput, Trainer

__all__ = ["Job", "RunningTask", "Worker", "WorkerState", "insecure_channel", "tls_channel_factory"]

log = logging.getLogger("fedcore.worker")

# Refusals a retry cannot fix.
_PERMANENT = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}
# The largest chunk a coordinator may be configured with, plus envelope.
_MAX_RECEIVE = max_message_bytes(64 * 1024 * 1024)

ChannelFactory = Callable[[str], grpc.aio.Channel]
_T = TypeVar("_T")


@dataclass(frozen=True)
class RunningTask:
    """The task a worker runs now: its round, its kind (``fit``...) and when it started."""

    round: int
    kind: str
    started: float


class WorkerState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    READY = "ready"
    WORKING = "working"
    FINISHED = "finished"


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.DISCONNECTED: frozenset({WorkerState.CONNECTING}),
    WorkerState.CONNECTING: frozenset({WorkerState.READY, WorkerState.DISCONNECTED}),
    WorkerState.READY: frozenset(
        {WorkerState.WORKING, WorkerState.DISCONNECTED, WorkerState.FINISHED}
    ),
    WorkerState.WORKING: frozenset(
        {WorkerState.READY, WorkerState.DISCONNECTED, WorkerState.FINISHED}
    ),
    WorkerState.FINISHED: frozenset(),
}


_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_RECEIVE),
    ("grpc.max_send_message_length", _MAX_RECEIVE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    *FLOW_CONTROL_OPTIONS,
]


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A plaintext channel with fedcore's message limits."""
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)


def tls_channel_factory(tls: ClientTLS) -> ChannelFactory:
    """Channels that verify the coordinator against ``tls.ca`` (and present the worker's
    certificate for mutual TLS). PEM files are read once, here, so a bad path fails at start."""
    credentials = tls.credentials()
    options = _CHANNEL_OPTIONS + tls.channel_options()

    def make(target: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options)

    return make


class _Disconnected(Exception):
    """The stream ended without a Shutdown: reconnect."""


async def _not_connected(message: pb.WorkerMessage) -> None:
    raise _Disconnected("no stream to send on")


@dataclass(eq=False)
class Job:
    """A task and its payloads: the frozen parameters' chunks (when attached) come first.

    Attributes:
        task: the task as received.
        checked: what the gate admitted; None when it refused the task (its payloads are
            read and dropped).
        assembler: the (trainable) weights the task carries.
        frozen: the frozen parameters, when the task attaches them.
    """

    task: pb.Task
    checked: CheckedTask | None
    assembler: PayloadAssembler
    frozen: PayloadAssembler | None = None

    @property
    def complete(self) -> bool:
        return self.assembler.complete and not self._receiving_frozen

    @property
    def _receiving_frozen(self) -> bool:
        return self.frozen is not None and not self.frozen.complete

    def add(self, chunk: RawChunk | pb.PayloadChunk) -> bool:
        """Take the next chunk; True once every payload of the task is complete."""
        if self._receiving_frozen:
            assert self.frozen is not None
            self.frozen.add(chunk)
        else:
            self.assembler.add(chunk)
        return self.complete


def _trainable_part(fit: FitOutput, trainable: Weights) -> FitOutput:
    """Only the trainable parameters of a fit: frozen ones are never uploaded."""
    missing = [name for name in trainable if name not in fit.weights]
    if missing:
        raise TrainingFailed(f"the trainer returned no {missing[:4]}")
    return replace(fit, weights={name: fit.weights[name] for name in trainable})


class Worker:
    """A federation member. ``await Worker(server, name, trainer).run()`` until shutdown.

    Args:
        server: the coordinator's ``HOST:PORT``.
        name: this worker's unique name in the federation.
        trainer: what runs the plans (see :class:`~fedcore.worker.TorchTrainer`).
        max_model_bytes: the largest model accepted from the coordinator.
        backoff_initial / backoff_max: reconnect delays in seconds (exponential, jittered).
        give_up_after: stop retrying after this many seconds without a session (None: never).
        channel_factory: makes the gRPC channel (TLS, tests, custom options).
        guard: the data owner's policy; tasks that break it are refused.
        gate: what admits tasks (default: a :class:`~.gate.Gate` over the worker's registry
            and the trainer's configured model, ``max_model_bytes``, ``guard``, ``plans`` and
            ``frozen``).
        plans: the shipped plans this worker verifies and runs (None: refused).
        dataset: the local data's public description, advertised in the hello.
        token: this worker's enrollment token, sent with every connection attempt.
        analytics: answers federated-analytics queries over a local table (its check is
            registered with the gate).
        tls: what ``channel_factory`` verifies, to explain TLS failures in one line.
        frozen: where plans' frozen parameters are kept (default: in memory only; with a
            ``gate``, the gate's).
        identity: this silo's signing key and roster: signed secure aggregation only.
        participation: the on-disk record of masked contributions (refuses replays).
    """

    def __init__(
        self,
        server: str,
        name: str,
        trainer: Trainer,
        *,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        give_up_after: float | None = 900.0,
        channel_factory: ChannelFactory = insecure_channel,
        guard: PolicyGuard | None = None,
        gate: Gate | None = None,
        plans: PlanLibrary | None = None,
        dataset: DatasetMetadata | None = None,
        token: str | None = None,
        analytics: QueryResponder | None = None,
        tls: ClientTLS | None = None,
        frozen: FrozenStore | None = None,
        identity: SiloIdentity | None = None,
        participation: ParticipationLog | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.server = server
        #: The data owner's hash-chained audit log (``fed-worker --audit-log``), or None.
        self.audit = audit
        self.name = name
        self.trainer = trainer
        self.max_model_bytes = max_model_bytes
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self._channel_factory = channel_factory
        self.guard = guard
        if gate is None:
            announced = trainer.announced_model()
            catalog = ModelCatalog(announced[0] if announced is not None else None)
            gate = Gate(
                catalog, max_model_bytes=max_model_bytes, guard=guard, plans=plans, frozen=frozen
            )
        elif frozen is not None and frozen is not gate.frozen:
            raise ConfigError("pass the frozen parameters' store to the Gate, not the Worker")
        self.gate = gate
        # The gate checks tasks against these; the runners read them.
        self.frozen = gate.frozen
        self.analytics = analytics
        if analytics is not None:
            analytics.attach(gate)
        self.dataset = dataset
        self.tls = tls
        self.tasks_refused = 0
        self._metadata = ((TOKEN_METADATA_KEY, token),) if token else None
        self.state = WorkerState.DISCONNECTED
        self.worker_id: str | None = None
        self.tasks_done = 0
        #: The tasks running now, by task id (read by the data owner's console).
        self.running: dict[str, RunningTask] = {}
        #: How many tasks (of different jobs) run at once: the owner's ``[jobs] max-tasks``.
        self.max_tasks = guard.policy.max_tasks if guard is not None else 1
        # Update compression keeps what it lost between rounds (error feedback), per job: a
        # standing network's jobs never share it (the one-shot federation's job id is "").
        self._compressors: dict[str, Compressor] = {}
        # The global model arrives every round at the same size: its buffer is reused.
        self._buffers = BufferPool()
        self._write_lock = asyncio.Lock()
        # Held while one task's result (and its update's chunks) or error is written: the
        # coordinator reads one upload at a time on a stream.
        self._upload_lock = asyncio.Lock()
        # The tasks this session's stream holds (a new one per stream).
        self._slots = TaskSlots(self.max_tasks)
        # Taken around a trainer's calls unless it declares itself ``concurrent``.
        self._trainer_lock = threading.Lock()
        # Signed secure aggregation (fed-worker --signing-key --roster), else unsigned.
        self._identity = identity
        self._participation = participation
        self._secagg = SecAggRounds(
            _not_connected, name, identity=identity, participation=participation
        )

    @property
    def current(self) -> RunningTask | None:
        """The longest-running task now (the console's "current task"); None when idle."""
        return next(iter(self.running.values()), None)

    def _move(self, new: WorkerState) -> None:
        if new is not self.state and new not in _ALLOWED[self.state]:
            raise RuntimeError(f"worker state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    # ------------------------------------------------------------------ connection loop

    async def run(self) -> None:
        """Serve the federation until the coordinator says it is over."""
        attempt = 0
        last_session = time.monotonic()
        explained = ""  # the last diagnosis logged as a warning (repeats go to INFO)
        while True:
            self._move(WorkerState.CONNECTING)
            try:
                async with self._channel_factory(self.server) as channel:
                    finished = await self._session(channel)
                if finished:
                    return
                reason = "the coordinator closed the stream"
                attempt = 0
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _PERMANENT:
                    self._move(WorkerState.DISCONNECTED)
                    details = exc.details() or exc.code().name
                    if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                        raise AuthenticationError(details) from None
                    if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                        raise IdentityMismatchError(details) from None
                    raise RejectedError(details) from None
                reason = f"{exc.code().name}: {exc.details()}"
                # Only a connection that never got a session is a set-up question.
                handshake = self.state is WorkerState.CONNECTING
                diagnosis = diagnose(exc, server=self.server, tls=self.tls) if handshake else None
                if diagnosis is not None:
                    if diagnosis.permanent:
                        self._move(WorkerState.DISCONNECTED)
                        raise RejectedError(diagnosis.message) from None
                    if diagnosis.message != explained:
                        log.warning("%s; retrying", diagnosis.message)
                        explained = diagnosis.message
            except _Disconnected as exc:
                reason = str(exc)
            if self.state in (WorkerState.READY, WorkerState.WORKING):
                last_session = time.monotonic()
            self._move(WorkerState.DISCONNECTED)
            if (
                self.give_up_after is not None
                and time.monotonic() - last_session > self.give_up_after
            ):
                raise RejectedError(
                    f"could not reach a coordinator at {self.server} for {self.give_up_after:g} s; "
                    f"last error: {reason}"
                )
            delay = min(self.backoff_max, self.backoff_initial * 2**attempt) * random.uniform(
                0.5, 1.0
            )
            attempt = min(attempt + 1, 30)
            log.info(
                "not connected (%s); retrying in %.1f s",
                reason,
                delay,
                extra={"event": "not_connected", "retry_in": delay, "reason": reason},
            )
            await asyncio.sleep(delay)

    def _hello(self) -> pb.WorkerMessage:
        hello = pb.Hello(
            name=self.name,
            protocol_version=PROTOCOL_VERSION,
            num_examples=self.trainer.num_examples,
            capabilities=["fit", "evaluate", SECAGG_CAPABILITY],
        )
        if self.analytics is not None:
            hello.capabilities.append(ANALYTICS_CAPABILITY)
        announced = self.trainer.announced_model()
        if announced is not None:
            spec, signature = announced
            hello.model.CopyFrom(spec.to_proto())
            hello.model_signature.extend(signature_specs(signature))
        if self.dataset is not None:
            hello.dataset.CopyFrom(self.dataset.to_proto())
        hello.frozen_sha256.extend(self.frozen.held())
        if self.guard is not None:
            hello.release_model = self.guard.policy.release_model
        hello.max_tasks = self.max_tasks
        return pb.WorkerMessage(hello=hello)

    async def _session(self, channel: grpc.aio.Channel) -> bool:
        """One stream; True when the federation is over."""
        call = JoinStream(channel, self._metadata)
        await call.write(self._hello())
        first = await call.read()
        if first is None:
            raise _Disconnected("stream closed during the handshake")
        if isinstance(first, RawChunk) or first.WhichOneof("body") != "welcome":
            raise _Disconnected("the coordinator did not answer with a welcome")
        welcome = first.welcome
        # Permanent: the worker stops with VersionMismatchError instead of retrying.
        check_protocol_version(welcome.protocol_version, peer="the coordinator", us="worker")
        heartbeats = asyncio.create_task(
            self._heartbeats(call, max(welcome.heartbeat_interval_s, 0.1))
        )
        if welcome.HasField("model"):
            # Data that cannot fit the federation's model ends this worker before any task.
            try:
                await self._check_data(welcome.model)
            except DataError:
                heartbeats.cancel()
                call.cancel()
                self._move(WorkerState.DISCONNECTED)
                raise
        self.worker_id = welcome.worker_id
        self._move(WorkerState.READY)
        log.info(
            "joined %s as %r (id %s)",
            self.server,
            self.name,
            welcome.worker_id,
            extra={"event": "joined", "worker_id": welcome.worker_id},
        )
        jobs: asyncio.Queue[Job] = asyncio.Queue()

        async def send(message: pb.WorkerMessage) -> None:
            await self._write(call, message)

        self._secagg = SecAggRounds(
            send, self.name, identity=self._identity, participation=self._participation
        )
        if self.analytics is not None:
            self.analytics.reset()
        # A new stream: the coordinator forgot the old one's tasks.
        slots = self._slots = TaskSlots(self.max_tasks)
        runner = asyncio.create_task(self._run_jobs(call, jobs, slots))
        # The job whose payloads are arriving; None once they are all in. Its CheckedTask is
        # None when the gate refused it: its payloads are read and dropped.
        pending: Job | None = None
        try:
            while True:
                message = await call.read()
                if message is None:
                    raise _Disconnected("the coordinator closed the stream")
                if isinstance(message, RawChunk) or message.WhichOneof("body") == "chunk":
                    if pending is None:
                        raise _Disconnected("the coordinator sent a chunk outside of a task")
                    task_id = pending.task.task_id
                    chunk = message if isinstance(message, RawChunk) else message.chunk
                    try:
                        if pending.add(chunk):
                            # No local keeps the job: the runner frees its buffers.
                            if pending.checked is not None:
                                jobs.put_nowait(pending)
                            pending = None
                    except PayloadError as exc:
                        await self._send_error(call, task_id, pb.ERROR_CODE_BAD_PAYLOAD, str(exc))
                        raise _Disconnected(f"bad payload from the coordinator: {exc}") from None
                    continue
                kind = message.WhichOneof("body")
                if kind == "shutdown":
                    log.info(
                        "federation over: %s",
                        message.shutdown.reason,
                        extra={"event": "federation_over", "reason": message.shutdown.reason},
                    )
                    self._move(WorkerState.FINISHED)
                    return True
                if kind == "job_end":
                    # A standing network's job is over; this worker stays for the next one.
                    end = message.job_end
                    self._compressors.pop(end.job_id, None)
                    job_id, reason = printable(end.job_id, 32), printable(end.reason, 200)
                    log.info(
                        "job %s ended: %s",
                        job_id,
                        reason,
                        extra={"event": "job_ended", "job": job_id, "reason": reason},
                    )
                    if self.audit is not None:
                        self.audit.append("job-ended", job=end.job_id[:64], reason=end.reason[:200])
                    continue
                if kind == "secagg":
                    await self._secagg.handle(message.secagg)
                    continue
                if kind == "analytics":
                    if self.analytics is not None:
                        await self.analytics.handle(message.analytics, send)
                    continue
                if kind == "task":
                    if pending is not None:
                        # The coordinator sends a task's payloads right after it, whole.
                        raise _Disconnected("the coordinator sent a task amid another's payloads")
                    checked = await self._admit_within(call, message.task, slots)
                    if checked is not None and checked.secagg is not None:
                        await self._secagg.start(checked.task, checked.secagg_rules)
                    job = await self._start_task(call, message.task, checked, welcome)
                    if not job.complete:
                        pending = job
                    elif checked is not None:
                        jobs.put_nowait(job)
                    del job  # no local keeps a job: the runner frees its buffers
        finally:
            heartbeats.cancel()
            runner.cancel()
            call.cancel()

    async def _check_data(self, announced: pb.ModelSpec) -> None:
        """Raise :class:`DataError` when the local data cannot fit the federation's model.
        Only a model the gate would admit is built for the check (one this worker's catalog
        allows, within --max-model-bytes, sized on the meta device first); any other is
        refused when its plan arrives."""
        try:
            spec = ModelSpec.from_proto(announced)
            size = total_bytes(self.gate.catalog.signature(spec))
        except (ConfigError, ModelError) as exc:
            log.debug("not checking the data against model %r: %s", announced.name, exc)
            return
        if size > self.gate.max_model_bytes:
            return
        try:
            await asyncio.to_thread(self.trainer.check_data, spec)
        except (ConfigError, ModelError) as exc:  # the plan's own checks will report it
            log.debug("cannot check the data against model %s: %s", spec, exc)

    async def _start_task(
        self, call: JoinStream, task: pb.Task, checked: CheckedTask | None, welcome: pb.Welcome
    ) -> Job:
        limit = max(welcome.chunk_bytes, 1)
        try:
            assembler = PayloadAssembler(
                task.weights,
                max_bytes=self.max_model_bytes,
                max_chunk_bytes=limit,
                what=f"round {task.round} weights",
                buffers=self._buffers,
            )
            frozen = None
            if task.frozen.attached:  # read (and dropped) for a refused task too
                frozen = PayloadAssembler(
                    task.frozen.header,
                    max_bytes=self.max_model_bytes,
                    max_chunk_bytes=limit,
                    what=f"round {task.round} frozen parameters",
                )
            return Job(task, checked, assembler, frozen)
        except PayloadError as exc:
            await self._send_error(call, task.task_id, pb.ERROR_CODE_BAD_PAYLOAD, str(exc))
            raise _Disconnected(f"bad plan from the coordinator: {exc}") from None

    # ------------------------------------------------------------------ the gate

    async def _admit_within(
        self, call: JoinStream, task: pb.Task, slots: TaskSlots
    ) -> CheckedTask | None:
        """:meth:`_admit` for a task within the owner's ``[jobs] max-tasks`` (held in
        ``slots`` until its answer is written); None after a refusal."""
        try:
            slots.take(task.task_id, task.job_id)
        except TaskRefused as exc:  # before the gate: nothing of it is asked of the owner
            await self._refuse(call, task, exc, held=False)
            return None
        checked = await self._admit(call, task)
        if checked is None:
            slots.release(task.task_id)
        return checked

    async def _admit(self, call: JoinStream, task: pb.Task) -> CheckedTask | None:
        """The checked task, or None after telling the coordinator why it was refused."""
        try:
            return await asyncio.to_thread(self.gate.admit, task)
        except TaskRefused as exc:
            await self._refuse(call, task, exc)
            return None
        except PayloadError as exc:
            # Frozen parameters the coordinator believes are here (a cache entry found damaged):
            # a new session's hello tells it what really is. No error is sent: the coordinator
            # would count it as a failure of the plan itself, which a retry would repeat.
            raise _Disconnected(f"{exc}; reconnecting to receive them") from None

    async def _refuse(
        self, call: JoinStream, task: pb.Task, refusal: TaskRefused, *, held: bool = True
    ) -> None:
        """Tell the coordinator why ``task`` is refused (``held``: its slot is freed; False
        for a task refused for want of one, whose id may be a held task's)."""
        self.tasks_refused += 1
        what = "training" if task.kind == pb.TASK_KIND_FIT else "evaluation"
        log.warning(
            "round %d: %s task %s",
            task.round,
            what,
            refusal,
            extra={
                "event": "task_refused",
                "round": task.round,
                "rule": refusal.rule,
                "reason": refusal.reason,
            },
        )
        self._record("refused", task, rule=refusal.rule, reason=refusal.reason[:300])
        # Awaiting the owner's decision is not a failure of the plan: the round waits for it.
        code = (
            pb.ERROR_CODE_AWAITING_APPROVAL
            if isinstance(refusal, AwaitingApproval)
            else pb.ERROR_CODE_REFUSED
        )
        await self._send_error(call, task.task_id, code, str(refusal), held=held)

    def _record(self, event: str, task: pb.Task, **fields: object) -> None:
        """An audit entry for ``task``: its job, round, kind, plan and DP terms."""
        if self.audit is None:
            return
        self.audit.append(
            event,
            job=task.job_id[:64],
            round=task.round,
            kind="fit" if task.kind == pb.TASK_KIND_FIT else "evaluate",
            model=task.model.name[:128],
            plan=task.plan.hash[:64] if task.HasField("plan") else None,
            terms={k: v for k, v in sorted(task.train.extra.items())[:32]},
            secagg=task.HasField("secagg"),
            **fields,
        )

    # ------------------------------------------------------------------ tasks

    async def _run_jobs(self, call: JoinStream, jobs: asyncio.Queue[Job], slots: TaskSlots) -> None:
        """Run each admitted task as it arrives, at once: admission kept them within
        ``[jobs] max-tasks`` and to one per job."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                task = asyncio.create_task(self._run_job(call, await jobs.get(), slots))
                running.add(task)
                # Dropped once done, and with it the job's model-sized buffers.
                task.add_done_callback(running.discard)
                del task
        finally:
            for task in list(running):
                task.cancel()

    async def _run_job(self, call: JoinStream, job: Job, slots: TaskSlots) -> None:
        checked = job.checked
        assert checked is not None  # refused tasks are never queued
        task_id = checked.task_id
        self._move(WorkerState.WORKING)
        self.running[task_id] = RunningTask(checked.task.round, checked.kind, time.time())
        try:
            await self._run_task(call, checked, job)
        finally:
            slots.release(task_id)  # freed by its answer already, unless none was written
            del self.running[task_id]
            if not self.running and self.state is WorkerState.WORKING:
                self._move(WorkerState.READY)

    async def _model_weights(self, job: Job, weights: Weights) -> Weights:
        """The whole model: the task's (trainable) ``weights`` plus its frozen parameters."""
        task = job.task
        if not task.HasField("frozen"):
            return weights
        digest, frozen = task.frozen.sha256, job.frozen
        if frozen is not None:
            held = await asyncio.to_thread(
                self.frozen.put, digest, frozen.weights(), frozen.signature
            )
        else:
            held = await asyncio.to_thread(self.frozen.get, digest)
        overlap = set(held) & set(weights)
        if overlap:  # the gate refuses this; checked again on the bytes received
            raise PayloadError(f"parameters {sorted(overlap)[:4]} are both frozen and trained")
        return {**held, **weights}

    async def _run_task(self, call: JoinStream, checked: CheckedTask, job: Job) -> None:
        task = checked.task
        try:
            weights = job.assembler.weights()
            # The gate admits only the kinds it checks (fit, evaluate): its table is the one.
            runner = self._fit if checked.kind == "fit" else self._evaluate
            await runner(call, checked, job, weights)
            self.tasks_done += 1
            self._record("ran", task)
        except TaskRefused as exc:
            if checked.secagg is not None:
                await self._secagg.abandon(task, str(exc))
            await self._refuse(call, task, exc)
        except SecAggError as exc:
            log.error("round %d: secure aggregation failed: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_REFUSED, str(exc))
        except ModelMismatchError as exc:
            log.error("cannot run round %d: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_MODEL_MISMATCH, str(exc))
        except FedcoreError as exc:  # TrainingFailed, PayloadError, ...
            log.error("round %d failed: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_TRAINING_FAILED, str(exc))
        except Exception as exc:  # a user trainer's bug must not leave the round waiting
            log.exception("round %d: the trainer raised", task.round)
            message = f"the trainer raised {type(exc).__name__}: {exc}"
            await self._send_error(call, task.task_id, pb.ERROR_CODE_TRAINING_FAILED, message)

    async def _fit(
        self, call: JoinStream, checked: CheckedTask, job: Job, weights: Weights
    ) -> None:
        task = checked.task
        chunk_bytes = job.assembler.chunk_bytes
        config = checked.train
        assert config is not None  # the gate's fit check sets it
        digest = await asyncio.to_thread(self.gate.check_weights, checked, weights)
        full = await self._model_weights(job, weights)
        if task.HasField("frozen"):
            # Only what the task carries trains; the frozen parameters stay as they are.
            config = replace(config, trainable=tuple(weights))
        log.info(
            "round %d: training %s on %d examples",
            task.round,
            checked.model,
            self.trainer.num_examples,
            extra={
                "event": "training",
                "round": task.round,
                "model": checked.model.name,
                "job": printable(task.job_id, 32),
            },
        )
        fit = await asyncio.to_thread(self._trained, self.trainer.fit, checked.model, full, config)
        del full
        if task.HasField("frozen"):
            fit = _trainable_part(fit, weights)
        # Client-level DP, when the plan asks for it: clip (and noise) before masking.
        fit = await asyncio.to_thread(apply_client_dp, fit, weights, checked.dp)
        local = fit.metrics  # for this worker's log only
        # Charged before anything leaves; a refusal here sends nothing.
        fit = await asyncio.to_thread(self.gate.release_fit, checked, fit)
        if checked.secagg is not None:
            self.gate.record_contribution(checked, digest)
            masked = await self._secagg.mask(
                task, weights, fit.weights, is_delta=fit.is_delta, examples=fit.num_examples
            )
            update: Weights = {MASKED_TENSOR: masked}
            result = pb.TaskResult(
                task_id=task.task_id,
                num_examples=0,  # secret: only the sum is revealed, inside the mask
                metrics=fit.metrics,
                update=make_header(update, chunk_bytes),
                update_kind=pb.UPDATE_KIND_MASKED,
            )
            what = "masked input"
        else:
            update, is_delta = await asyncio.to_thread(
                self._encode_update, fit, weights, config, task.job_id
            )
            result = pb.TaskResult(
                task_id=task.task_id,
                num_examples=fit.num_examples,
                metrics=fit.metrics,
                update=make_header(update, chunk_bytes),
                update_kind=pb.UPDATE_KIND_DELTA if is_delta else pb.UPDATE_KIND_WEIGHTS,
            )
            what = "update"
            compressor = self._compressors.get(task.job_id)
            if is_delta and compressor is not None:
                what = f"{compressor.scheme}-compressed update"
        chunks = (
            # Pre-serialized: the stream's serializer passes bytes through.
            encode_chunk_message(CHUNK_FIELD_IN_WORKER_MESSAGE, index, data)
            for index, data in enumerate(iter_chunk_views(update, chunk_bytes))
        )
        await self._answer(
            call, task.task_id, itertools.chain([pb.WorkerMessage(result=result)], chunks)
        )
        log.info(
            "round %d: sent %s of %s (training loss %.4f, accuracy %.2f%%, %.1f s)",
            task.round,
            what,
            format_bytes(result.update.total_bytes),  # a LoRA update is kB, not "0.0 MB"
            local.get("loss", float("nan")),
            100 * local.get("accuracy", float("nan")),
            local.get("train_seconds", float("nan")),
            extra={"event": "update_sent", "round": task.round, "job": printable(task.job_id, 32)},
        )

    async def _evaluate(
        self, call: JoinStream, checked: CheckedTask, job: Job, weights: Weights
    ) -> None:
        full = await self._model_weights(job, weights)
        ev = await asyncio.to_thread(self._trained, self.trainer.evaluate, checked.model, full)
        ev = await asyncio.to_thread(self.gate.release_evaluation, checked, ev)
        result = pb.TaskResult(
            task_id=checked.task_id, num_examples=ev.num_examples, metrics=ev.metrics
        )
        await self._answer(call, checked.task_id, [pb.WorkerMessage(result=result)])

    def _trained(self, method: Callable[..., _T], *args: Any) -> _T:
        """``method(*args)`` of the trainer (in a worker thread): one call at a time unless
        the trainer is ``concurrent``."""
        if self.trainer.concurrent:
            return method(*args)
        with self._trainer_lock:
            return method(*args)

    def _encode_update(
        self, fit: FitOutput, received: Weights, config: TrainConfig, job: str
    ) -> tuple[Weights, bool]:
        """The update to send and whether it is a delta: compressed (with error feedback)
        when the plan asks for it, else as the trainer produced it."""
        scheme = scheme_from_code(config.extra.get(EXTRA_KEY, 0.0))
        if scheme == "none":
            return fit.weights, fit.is_delta
        compressor = self._compressors.get(job)
        if compressor is None or compressor.scheme != scheme:
            compressor = self._compressors[job] = Compressor(scheme)
        if fit.is_delta:
            delta = fit.weights
        else:
            delta = {
                name: np.subtract(array, received[name], dtype=array.dtype)
                for name, array in fit.weights.items()
            }
        return compressor.compress(delta), True

    async def _send_error(
        self,
        call: JoinStream,
        task_id: str,
        code: pb.ErrorCode.ValueType,
        message: str,
        *,
        held: bool = True,
    ) -> None:
        error = pb.WorkerMessage(error=pb.TaskError(task_id=task_id, code=code, message=message))
        await self._answer(call, task_id if held else None, [error])

    async def _answer(
        self,
        call: JoinStream,
        task_id: str | None,
        messages: Iterable[pb.WorkerMessage | bytes],
    ) -> None:
        """Write a task's answer (its result and update's chunks, or its error) whole, never
        amid another task's, and free its slot (``task_id``; None: none) just before the last
        message leaves. Not after: the coordinator may send the next task the moment that
        message arrives, and its read may run before this coroutine resumes from the write."""
        async with self._upload_lock:
            last: pb.WorkerMessage | bytes | None = None
            for message in messages:
                if last is not None:
                    await self._write(call, last)
                last = message
            if task_id is not None:
                self._slots.release(task_id)
            if last is not None:
                await self._write(call, last)

    async def _write(self, call: JoinStream, message: pb.WorkerMessage | bytes) -> None:
        async with self._write_lock:
            await call.write(message)

    async def _heartbeats(self, call: JoinStream, interval: float) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            await self._write(call, pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=sequence)))
