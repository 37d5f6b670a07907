"""The worker runtime: connect, say hello, run the plans the coordinator streams, reconnect.

The session is an explicit state machine::

    DISCONNECTED ──▶ CONNECTING ──▶ READY ◀──▶ WORKING
         ▲               │            │           │
         └───────────────┴────────────┴───────────┘   (connection lost: back off, retry)
                                      │
                                      ▼
                                  FINISHED          (the coordinator said the federation is over)

With a :class:`~.policy.PolicyGuard` every task is reviewed against the data owner's policy
the moment it arrives: a task that breaks it is answered with ``ERROR_CODE_REFUSED`` and the
rule it breaks (also logged here), and nothing of it runs. An accepted training round is
charged to the silo's privacy ledger just before its update leaves.

Training runs in a thread so heartbeats keep flowing on the same stream. A connection that
cannot be made, or breaks, is retried with exponential backoff and jitter; a refusal that a
retry cannot fix (wrong protocol version, wrong model, bad name) ends the worker with
:class:`~fedcore.errors.RejectedError`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

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
    FedcoreError,
    IdentityMismatchError,
    LedgerError,
    ModelMismatchError,
    PayloadError,
    RejectedError,
    SecAggError,
)
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import Refusal
from fedcore.protocol import (
    DEFAULT_MAX_MODEL_BYTES,
    JOIN_METHOD,
    PROTOCOL_VERSION,
    SECAGG_CAPABILITY,
    STREAM_END,
    deserialize_coordinator_message,
    max_message_bytes,
    serialize_worker_message,
)
from fedcore.secagg.wire import MASKED_TENSOR
from fedcore.tls import ClientTLS
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from .frozen import FrozenStore
from .policy import PolicyGuard
from .privacy import apply_client_dp
from .secagg import SecAggRounds
from .trainer import FitOutput, Trainer, TrainingFailed

__all__ = ["Worker", "WorkerState", "insecure_channel", "tls_channel_factory"]

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
class _Job:
    """A task and its payloads: the frozen parameters' chunks (when attached) come first."""

    task: pb.Task
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
        dataset: the local data's public description, advertised in the hello.
        token: this worker's enrollment token, sent with every connection attempt.
        frozen: where plans' frozen parameters are kept (default: in memory only).
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
        dataset: DatasetMetadata | None = None,
        token: str | None = None,
        frozen: FrozenStore | None = None,
    ) -> None:
        self.server = server
        self.name = name
        self.trainer = trainer
        self.max_model_bytes = max_model_bytes
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self._channel_factory = channel_factory
        self.guard = guard
        self.dataset = dataset
        self.frozen = frozen if frozen is not None else FrozenStore()
        self.tasks_refused = 0
        self._metadata = ((TOKEN_METADATA_KEY, token),) if token else None
        self.state = WorkerState.DISCONNECTED
        self.worker_id: str | None = None
        self.tasks_done = 0
        # Update compression keeps what it lost between rounds (error feedback).
        self._compressor: Compressor | None = None
        self._write_lock = asyncio.Lock()
        self._secagg = SecAggRounds(_not_connected, name)

    def _move(self, new: WorkerState) -> None:
        if new is not self.state and new not in _ALLOWED[self.state]:
            raise RuntimeError(f"worker state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    # ------------------------------------------------------------------ connection loop

    async def run(self) -> None:
        """Serve the federation until the coordinator says it is over."""
        attempt = 0
        last_session = time.monotonic()
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
            log.info("not connected (%s); retrying in %.1f s", reason, delay)
            await asyncio.sleep(delay)

    def _hello(self) -> pb.WorkerMessage:
        hello = pb.Hello(
            name=self.name,
            protocol_version=PROTOCOL_VERSION,
            num_examples=self.trainer.num_examples,
            capabilities=["fit", "evaluate", SECAGG_CAPABILITY],
        )
        announced = self.trainer.announced_model()
        if announced is not None:
            spec, signature = announced
            hello.model.CopyFrom(spec.to_proto())
            hello.model_signature.extend(signature_specs(signature))
        if self.dataset is not None:
            hello.dataset.CopyFrom(self.dataset.to_proto())
        hello.frozen_sha256.extend(self.frozen.held())
        return pb.WorkerMessage(hello=hello)

    async def _session(self, channel: grpc.aio.Channel) -> bool:
        """One stream; True when the federation is over."""
        open_stream: Any = channel.stream_stream(
            JOIN_METHOD,
            request_serializer=serialize_worker_message,
            response_deserializer=deserialize_coordinator_message,
        )
        call = open_stream(metadata=self._metadata)
        await call.write(self._hello())
        first = await call.read()
        if first is STREAM_END:
            raise _Disconnected("stream closed during the handshake")
        if isinstance(first, RawChunk) or first.WhichOneof("body") != "welcome":
            raise _Disconnected("the coordinator did not answer with a welcome")
        welcome = first.welcome
        self.worker_id = welcome.worker_id
        self._move(WorkerState.READY)
        log.info("joined %s as %r (id %s)", self.server, self.name, welcome.worker_id)
        heartbeats = asyncio.create_task(
            self._heartbeats(call, max(welcome.heartbeat_interval_s, 0.1))
        )
        jobs: asyncio.Queue[_Job] = asyncio.Queue()

        async def send(message: pb.WorkerMessage) -> None:
            await self._write(call, message)

        self._secagg = SecAggRounds(send, self.name)
        runner = asyncio.create_task(self._run_jobs(call, jobs))
        pending: _Job | None = None
        discard = False  # the pending task was refused: its weights are read and dropped
        try:
            while True:
                message = await call.read()
                if message is STREAM_END:
                    raise _Disconnected("the coordinator closed the stream")
                chunk = message if isinstance(message, RawChunk) else None
                kind = "chunk" if chunk is not None else message.WhichOneof("body")
                if kind == "shutdown":
                    log.info("federation over: %s", message.shutdown.reason)
                    self._move(WorkerState.FINISHED)
                    return True
                if kind == "secagg":
                    await self._secagg.handle(message.secagg)
                    continue
                if kind == "task":
                    refusal = await self._review(message.task) or self._check_frozen(message.task)
                    discard = refusal is not None
                    if refusal is not None:
                        await self._refuse(call, message.task, refusal)
                    elif message.task.HasField("secagg"):
                        await self._secagg.start(message.task)
                    pending = await self._start_task(call, message.task, welcome, discard)
                    if pending is not None and pending.complete:
                        if not discard:
                            jobs.put_nowait(pending)
                        pending = None
                elif kind == "chunk":
                    current = pending
                    if current is None:
                        raise _Disconnected("the coordinator sent a chunk outside of a task")
                    try:
                        if current.add(chunk if chunk is not None else message.chunk):
                            if not discard:
                                jobs.put_nowait(current)
                            pending = None
                    except PayloadError as exc:
                        await self._send_error(
                            call, current.task.task_id, pb.ERROR_CODE_BAD_PAYLOAD, str(exc)
                        )
                        raise _Disconnected(f"bad payload from the coordinator: {exc}") from None
        finally:
            heartbeats.cancel()
            runner.cancel()
            call.cancel()

    async def _start_task(
        self, call: Any, task: pb.Task, welcome: pb.Welcome, refused: bool
    ) -> _Job | None:
        limit = max(welcome.chunk_bytes, 1)
        try:
            assembler = PayloadAssembler(
                task.weights,
                max_bytes=self.max_model_bytes,
                max_chunk_bytes=limit,
                what=f"round {task.round} weights",
            )
            frozen = None
            if task.frozen.attached:
                frozen = PayloadAssembler(
                    task.frozen.header,
                    max_bytes=self.max_model_bytes,
                    max_chunk_bytes=limit,
                    what=f"round {task.round} frozen parameters",
                )
            elif task.HasField("frozen") and not (refused or self.frozen.holds(task.frozen.sha256)):
                # The coordinator believes this worker holds them (a cache entry found damaged
                # since): a new session's hello tells it what is really here.
                raise PayloadError(
                    f"frozen parameters {task.frozen.sha256[:12]} were not sent and are "
                    "not held here; reconnecting to fetch them"
                )
        except PayloadError as exc:
            await self._send_error(call, task.task_id, pb.ERROR_CODE_BAD_PAYLOAD, str(exc))
            raise _Disconnected(f"bad plan from the coordinator: {exc}") from None
        return _Job(task, assembler, frozen)

    def _check_frozen(self, task: pb.Task) -> Refusal | None:
        """A plan whose frozen parameters are not the ones the data owner's file holds."""
        pinned = self.frozen.pinned
        if not task.HasField("frozen") or pinned is None or task.frozen.sha256 == pinned:
            return None
        return Refusal(
            "frozen-weights",
            f"the plan's frozen parameters (sha256 {task.frozen.sha256[:12]}) differ from the "
            f"data owner's file {self.frozen.owner_path} (sha256 {pinned[:12]})",
        )

    # ------------------------------------------------------------------ policy

    async def _review(self, task: pb.Task) -> Refusal | None:
        if self.guard is None:
            return None
        try:
            return await asyncio.to_thread(self.guard.review, task)
        except LedgerError as exc:  # fail closed: no ledger, no release
            return Refusal("budget", f"the silo's privacy ledger is unusable: {exc}")

    async def _refuse(self, call: Any, task: pb.Task, refusal: Refusal) -> None:
        self.tasks_refused += 1
        what = "training" if task.kind == pb.TASK_KIND_FIT else "evaluation"
        log.warning("round %d: %s task %s", task.round, what, refusal)
        await self._send_error(call, task.task_id, pb.ERROR_CODE_REFUSED, str(refusal))

    # ------------------------------------------------------------------ tasks

    async def _run_jobs(self, call: Any, jobs: asyncio.Queue[_Job]) -> None:
        while True:
            # No local keeps a finished job: its model-sized buffer is freed before the next
            # round's weights arrive.
            await self._run_job(call, await jobs.get())

    async def _run_job(self, call: Any, job: _Job) -> None:
        self._move(WorkerState.WORKING)
        try:
            await self._run_task(call, job)
        finally:
            if self.state is WorkerState.WORKING:
                self._move(WorkerState.READY)

    async def _model_weights(self, job: _Job, weights: Weights) -> Weights:
        """The whole model: the plan's (trainable) ``weights`` plus its frozen parameters."""
        if not job.task.HasField("frozen"):
            return weights
        digest, frozen = job.task.frozen.sha256, job.frozen
        if frozen is not None:
            held = await asyncio.to_thread(
                self.frozen.put, digest, frozen.weights(), frozen.signature
            )
        else:
            held = await asyncio.to_thread(self.frozen.get, digest)
        overlap = set(held) & set(weights)
        if overlap:
            raise PayloadError(f"parameters {sorted(overlap)[:4]} are both frozen and trained")
        return {**held, **weights}

    async def _run_task(self, call: Any, job: _Job) -> None:
        task, assembler = job.task, job.assembler
        try:
            weights = assembler.weights()
            full = await self._model_weights(job, weights)
            model = ModelSpec.from_proto(task.model)
            if task.kind == pb.TASK_KIND_FIT:
                config = TrainConfig.from_proto(task.train)
                if task.HasField("frozen"):
                    config = replace(config, trainable=tuple(weights))
                log.info(
                    "round %d: training %s on %d examples",
                    task.round,
                    model,
                    self.trainer.num_examples,
                )
                fit = await asyncio.to_thread(self.trainer.fit, model, full, config)
                if task.HasField("frozen"):
                    fit = _trainable_part(fit, weights)
                # Client-level DP, when the plan asks for it: clip (and noise) before masking.
                fit = await asyncio.to_thread(apply_client_dp, fit, weights, config)
                update = fit.weights
                if self.guard is not None:
                    # Charged before anything leaves; a refusal here sends nothing.
                    refusal = await asyncio.to_thread(self.guard.pay, task)
                    if refusal is not None:
                        if task.HasField("secagg"):
                            await self._secagg.abandon(str(refusal))
                        await self._refuse(call, task, refusal)
                        return
                if task.HasField("secagg"):
                    masked = await self._secagg.mask(
                        task, weights, fit.weights, is_delta=fit.is_delta, examples=fit.num_examples
                    )
                    update = {MASKED_TENSOR: masked}
                    result = pb.TaskResult(
                        task_id=task.task_id,
                        num_examples=0,  # secret: only the sum is revealed, inside the mask
                        metrics=fit.metrics,
                        update=make_header(update, assembler.chunk_bytes),
                        update_kind=pb.UPDATE_KIND_MASKED,
                    )
                    what = "masked input"
                else:
                    update, is_delta = await asyncio.to_thread(
                        self._encode_update, fit, weights, config
                    )
                    result = pb.TaskResult(
                        task_id=task.task_id,
                        num_examples=fit.num_examples,
                        metrics=fit.metrics,
                        update=make_header(update, assembler.chunk_bytes),
                        update_kind=pb.UPDATE_KIND_DELTA if is_delta else pb.UPDATE_KIND_WEIGHTS,
                    )
                    what = "update"
                    if is_delta and self._compressor is not None:
                        what = f"{self._compressor.scheme}-compressed update"
                await self._write(call, pb.WorkerMessage(result=result))
                chunks = iter_chunk_views(update, assembler.chunk_bytes)
                for index, data in enumerate(chunks):
                    # Pre-serialized: the stream's serializer passes bytes through.
                    await self._write(
                        call, encode_chunk_message(CHUNK_FIELD_IN_WORKER_MESSAGE, index, data)
                    )
                log.info(
                    "round %d: sent %s of %.1f MB (training loss %.4f, accuracy %.2f%%, %.1f s)",
                    task.round,
                    what,
                    result.update.total_bytes / 1e6,
                    fit.metrics.get("loss", float("nan")),
                    100 * fit.metrics.get("accuracy", float("nan")),
                    fit.metrics.get("train_seconds", float("nan")),
                )
            elif task.kind == pb.TASK_KIND_EVALUATE:
                refusal = (
                    await asyncio.to_thread(self.guard.pay, task)
                    if self.guard is not None
                    else None
                )
                if refusal is not None:
                    await self._refuse(call, task, refusal)
                    return
                ev = await asyncio.to_thread(self.trainer.evaluate, model, full)
                result = pb.TaskResult(
                    task_id=task.task_id, num_examples=ev.num_examples, metrics=ev.metrics
                )
                await self._write(call, pb.WorkerMessage(result=result))
            else:
                await self._send_error(
                    call, task.task_id, pb.ERROR_CODE_UNSUPPORTED, f"unknown task kind {task.kind}"
                )
                return
            self.tasks_done += 1
        except SecAggError as exc:
            log.error("round %d: secure aggregation failed: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_REFUSED, str(exc))
        except ModelMismatchError as exc:
            log.error("cannot run round %d: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_MODEL_MISMATCH, str(exc))
        except (TrainingFailed, PayloadError) as exc:
            log.error("round %d failed: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_TRAINING_FAILED, str(exc))
        except FedcoreError as exc:
            log.error("round %d failed: %s", task.round, exc)
            await self._send_error(call, task.task_id, pb.ERROR_CODE_TRAINING_FAILED, str(exc))
        except Exception as exc:  # a user trainer's bug must not leave the round waiting
            log.exception("round %d: the trainer raised", task.round)
            message = f"the trainer raised {type(exc).__name__}: {exc}"
            await self._send_error(call, task.task_id, pb.ERROR_CODE_TRAINING_FAILED, message)

    def _encode_update(
        self, fit: FitOutput, received: Weights, config: TrainConfig
    ) -> tuple[Weights, bool]:
        """The update to send and whether it is a delta: compressed (with error feedback)
        when the plan asks for it, else as the trainer produced it."""
        scheme = scheme_from_code(config.extra.get(EXTRA_KEY, 0.0))
        if scheme == "none":
            return fit.weights, fit.is_delta
        if self._compressor is None or self._compressor.scheme != scheme:
            self._compressor = Compressor(scheme)
        if fit.is_delta:
            delta = fit.weights
        else:
            delta = {
                name: np.subtract(array, received[name], dtype=array.dtype)
                for name, array in fit.weights.items()
            }
        return self._compressor.compress(delta), True

    async def _send_error(
        self, call: Any, task_id: str, code: pb.ErrorCode.ValueType, message: str
    ) -> None:
        await self._write(
            call, pb.WorkerMessage(error=pb.TaskError(task_id=task_id, code=code, message=message))
        )

    async def _write(self, call: Any, message: pb.WorkerMessage | bytes) -> None:
        async with self._write_lock:
            await call.write(message)

    async def _heartbeats(self, call: Any, interval: float) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            await self._write(call, pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=sequence)))
