"""The gRPC face of the coordinator: the Join stream handler and the server it runs in."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from fedcore.codec import RawChunk
from fedcore.errors import (
    AuthenticationError,
    ConfigError,
    IdentityMismatchError,
    ProtocolError,
    VersionMismatchError,
)
from fedcore.flow_control import server_flow_control
from fedcore.plan import ModelSpec
from fedcore.protocol import (
    PROTOCOL_VERSION,
    SECAGG_CAPABILITY,
    SERVICE_NAME,
    STREAM_END,
    Undecodable,
    check_protocol_version,
    deserialize_worker_message,
    max_message_bytes,
    serialize_coordinator_message,
)
from fedcore.sanitize import printable
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, describe_mismatch

from ..state.config import ServerConfig
from ..state.registry import QUIET_AFTER, WorkerRegistry, WorkerSession, crowd_level
from .admission import HandshakeGate, HandshakeRefused
from .auth import Authenticator
from .inbox import AnalyticsRoute, Inbox, SecAggRoute
from .limits import grpc_limit_options, max_concurrent_rpcs
from .listen import EXCLUSIVE_BIND, bind_failure
from .revocation import close_revoked
from .traffic import StreamJobs, TrafficCounters
from .untrusted import bound_announced_examples, clean_dataset

__all__ = ["CoordinatorService", "TrafficCounters", "start_grpc_server"]

log = logging.getLogger("fedcore.server")

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CoordinatorService:
    """Handles ``Coordinator.Join``: the handshake, then a reader and a writer per stream."""

    def __init__(
        self,
        config: ServerConfig,
        registry: WorkerRegistry,
        model: ModelSpec | None,
        signature: ModelSignature,
        authenticator: Authenticator | None = None,
    ) -> None:
        """``model`` None: a standing network, where each job judges its workers' models
        (server/jobs/workers.py) and any job may use secure aggregation."""
        self.config = config
        self.authenticator = authenticator or Authenticator(None, mutual_tls=False)
        self.registry = registry
        self.model = model
        self.signature = signature
        self.counters = TrafficCounters()
        self.secagg_allowed = config.secagg is not None or model is None
        self.accepting = True
        self._upload_slots = asyncio.Semaphore(config.limits.upload_slots)
        self.gate = HandshakeGate(config.limits.gate_limits)
        #: The running secure rounds' message handlers, by job id ("": a one-shot round).
        self._secagg_handlers: dict[str, SecAggRoute] = {}
        #: Where workers' analytics messages go (set when analytics is served).
        self.analytics_handler: AnalyticsRoute | None = None

    @property
    def upload_slots_full(self) -> bool:
        """Every upload slot is held (an upload that arrives now waits for one)."""
        return self._upload_slots.locked()

    def route_secagg(self, job_id: str, handler: SecAggRoute | None) -> None:
        """Send job ``job_id``'s secure-aggregation messages to ``handler`` (None: drop them).
        Each job's round gets only the messages that name its job."""
        if handler is None:
            self._secagg_handlers.pop(job_id, None)
        else:
            self._secagg_handlers[job_id] = handler

    def _route_secagg(
        self, session: WorkerSession, message: pb.SecAggWorkerMessage, jobs: StreamJobs
    ) -> None:
        if not self.secagg_allowed:
            raise ProtocolError("a secure-aggregation message arrived, but it is off")
        if message.job_id not in jobs.given:
            # Another job's round is never fed by a worker that holds no task of that job.
            log.warning(
                "refused a secure-aggregation message from %r for job %r: it was given no "
                "task of that job",
                session.name,
                printable(message.job_id, 64),
            )
            return
        handler = self._secagg_handlers.get(message.job_id)
        if handler is not None:
            handler(session, message)  # the round ignores a worker that is not its member
        else:
            log.debug(
                "dropping a secure-aggregation message from %r: job %r runs no secure round",
                session.name,
                printable(message.job_id, 64),
            )

    def _analytics_route(self, jobs: StreamJobs) -> AnalyticsRoute | None:
        """Where one stream's analytics messages go: the query of the job each names, only
        when this worker was asked a query of that job on this stream."""
        handler = self.analytics_handler
        if handler is None:
            return None

        def route(session: WorkerSession, message: pb.AnalyticsWorkerMessage) -> None:
            if jobs.query_job(message) is None:
                log.warning(
                    "refused an analytics message from %r for job %r: it was asked no query "
                    "of that job",
                    session.name,
                    printable(message.job_id, 64),
                )
                return
            handler(session, message)

        return route

    def rpc_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handler = grpc.stream_stream_rpc_method_handler(
            self.join,
            request_deserializer=deserialize_worker_message,
            response_serializer=serialize_coordinator_message,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Join": handler})

    # ------------------------------------------------------------------ handshake

    def _authenticate(
        self, hello: pb.Hello, context: grpc.aio.ServicerContext[Any, Any]
    ) -> str | None:
        close_revoked(self.authenticator, self.registry)
        try:
            return self.authenticator.authenticate(
                hello.name, context.invocation_metadata(), context.auth_context()
            )
        except IdentityMismatchError as exc:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        except AuthenticationError as exc:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except ConfigError as exc:  # the enrollment file became unreadable
            log.error("cannot check worker identities: %s", exc)
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE, "the coordinator cannot check identities now"
            ) from None

    def _check_hello(self, hello: pb.Hello) -> None:
        try:
            check_protocol_version(hello.protocol_version, peer="worker", us="coordinator")
        except VersionMismatchError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if not _NAME_PATTERN.match(hello.name):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker name {printable(hello.name, 64)!r} is invalid: use 1-128 letters, "
                "digits, '.', '_' or '-'",
            )
        if not self.accepting:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down")
        if len(self.registry) >= self.config.limits.max_workers:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the federation is full ({self.config.limits.max_workers} workers; see --max-workers)",
            )
        if self.registry.by_name(hello.name) is not None:
            raise _Abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"a worker named {hello.name!r} is already connected; names must be unique",
            )
        if self.config.secagg is not None and SECAGG_CAPABILITY not in hello.capabilities:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {hello.name!r} cannot do secure aggregation, which this federation "
                "requires; upgrade fedcore on the worker",
            )
        if self.model is None:
            return  # a standing network: jobs check models
        if hello.HasField("model") and hello.model.name and hello.model.name != self.model.name:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {hello.name!r} uses model {printable(hello.model.name, 64)}, "
                f"the federation runs {self.model.name}",
            )
        if hello.model_signature:
            from fedcore.codec import header_signature

            try:
                theirs = header_signature(pb.PayloadHeader(tensors=hello.model_signature))
            except KeyError:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "hello has an unknown dtype"
                ) from None
            problem = describe_mismatch(self.signature, theirs)
            if problem is not None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {hello.name!r} has a model that does not match the federation's "
                    f"{self.model}: {problem}",
                )

    # ------------------------------------------------------------------ stream

    async def join(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """One worker's session, from hello to shutdown."""
        peer = context.peer()
        try:
            with self.gate.admit(peer):
                admitted = await self._handshake(peer, context)
        except HandshakeRefused as exc:
            # A flood must not become a log flood: the 1st, 10th, 100th... refusal is a warning.
            refused = self.gate.refused
            level = logging.WARNING if math.log10(refused).is_integer() else logging.DEBUG
            log.log(level, "refused a stream from %s: %s (%d refused so far)", peer, exc, refused)
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if admitted is None:
            return
        hello, identity = admitted
        await self._session(hello, identity, peer, context)

    async def _handshake(
        self, peer: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[pb.Hello, str | None] | None:
        """Read and check the hello; the hello and the proven identity (None: the stream
        ended before its hello). Aborts the stream on a refusal."""
        try:
            first = await asyncio.wait_for(context.read(), self.config.limits.handshake_timeout)
        except TimeoutError:
            await _abort(
                context, grpc.StatusCode.DEADLINE_EXCEEDED, "no hello within the handshake timeout"
            )
        if first is STREAM_END:
            return None
        if isinstance(first, Undecodable):
            log.warning("refused a stream from %s: %s", peer, first.describe())
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, first.describe())
        if not isinstance(first, pb.WorkerMessage) or first.WhichOneof("body") != "hello":
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello"
            )
        hello = first.hello
        identity: str | None = None
        try:
            if hello.protocol_version == PROTOCOL_VERSION and _NAME_PATTERN.match(hello.name):
                identity = self._authenticate(hello, context)
            self._check_hello(hello)
        except _Abort as refusal:
            log.warning(
                "refused worker %r from %s: %s", printable(hello.name, 64), peer, refusal.details
            )
            await _abort(context, refusal.code, refusal.details)
        return hello, identity

    async def _session(
        self,
        hello: pb.Hello,
        identity: str | None,
        peer: str,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """The joined worker's stream: welcome, then read and write until it ends."""
        session = self.registry.new_session(hello, peer, identity)
        session.num_examples = bound_announced_examples(
            session.name, session.num_examples, self.config.limits.max_examples
        )
        session.dataset = clean_dataset(session.dataset)
        welcome = pb.CoordinatorMessage(
            welcome=pb.Welcome(
                worker_id=session.worker_id,
                protocol_version=PROTOCOL_VERSION,
                heartbeat_interval_s=self.config.limits.heartbeat_interval,
                max_message_bytes=max_message_bytes(self.config.limits.chunk_bytes),
                chunk_bytes=self.config.limits.chunk_bytes,
                model=self.model.to_proto() if self.model is not None else None,
            )
        )
        await context.write(welcome)
        await self.registry.activate(session)
        connected = len(self.registry)
        log.log(
            crowd_level(connected),
            "worker %r joined from %s with %d examples; %d connected",
            session.name,
            peer,
            session.num_examples,
            connected,
            extra={"event": "worker_joined", "worker": session.name, "connected": connected},
        )
        if connected == QUIET_AFTER + 1:
            log.info(
                "%d workers connected: further joins and departures are logged at DEBUG "
                "(--log-level DEBUG shows them); the roster before round 1 lists everyone",
                connected,
            )
        if session.dataset is not None:
            log.info("worker %r holds dataset %s", session.name, session.dataset.summary())
        if session.missing_tags:
            log.warning(
                "worker %r lacks the required tag(s) %s: it stays connected but is never selected",
                session.name,
                " ".join("#" + t for t in session.missing_tags),
                extra={
                    "event": "tags_missing",
                    "worker": session.name,
                    "tags": sorted(session.missing_tags),
                },
            )
        jobs = StreamJobs()  # whose bytes each message is (read and written on this loop)
        inbox = Inbox(
            session,
            signature=self.signature,
            max_model_bytes=self.config.limits.max_model_bytes,
            chunk_limit=self.config.limits.chunk_bytes,
            upload_slots=self._upload_slots,
            secagg=lambda who, message: self._route_secagg(who, message, jobs),
            analytics=self._analytics_route(jobs),
        )
        failure: list[_Abort] = []
        reader = asyncio.create_task(self._read(session, inbox, context, failure, jobs))
        watchdog = asyncio.create_task(self._watch(session, inbox))
        try:
            while True:
                item = await session.next_outgoing()
                if item is None:
                    break
                if not isinstance(item, pb.CoordinatorMessage | bytes):
                    for message in item.messages():
                        # Control messages (secure aggregation) go between two chunks.
                        while session.urgent:
                            urgent = session.urgent.popleft()
                            self.counters.count(jobs.outgoing(urgent), sent=urgent.ByteSize())
                            await context.write(urgent)
                        await context.write(message)
                        self.counters.count(jobs.payload(), sent=len(message))
                    # Hold no chunk (nor the model, through the payload) while idle.
                    item, message = None, b""
                    continue
                if isinstance(item, bytes):
                    job, size = jobs.payload(), len(item)
                else:
                    job, size = jobs.outgoing(item), item.ByteSize()
                await context.write(item)
                self.counters.count(job, sent=size)
        finally:
            reader.cancel()
            watchdog.cancel()
            inbox.release()
            self.authenticator.forget(session.name)
            await self.registry.remove(session, failure[0].details if failure else "stream ended")
        if failure:
            await _abort(context, failure[0].code, failure[0].details)

    async def _read(
        self,
        session: WorkerSession,
        inbox: Inbox,
        context: grpc.aio.ServicerContext[Any, Any],
        failure: list[_Abort],
        jobs: StreamJobs,
    ) -> None:
        reason = "worker closed the stream"
        try:
            while True:
                message = await context.read()
                if message is STREAM_END:
                    break
                session.last_seen = time.monotonic()
                if isinstance(message, RawChunk):
                    self.counters.count(jobs.incoming(None), received=message.wire_size)
                    await inbox.on_chunk(message)
                    continue
                if isinstance(message, Undecodable):
                    raise ProtocolError(message.describe())
                self.counters.count(jobs.incoming(message), received=message.ByteSize())
                await inbox.handle(message)
        except ProtocolError as exc:
            log.warning("worker %r broke the protocol: %s", session.name, exc)
            failure.append(_Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            reason = str(exc)
        except grpc.RpcError:
            reason = "connection lost"
        except Exception as exc:  # a coordinator bug: end this stream, keep the federation
            log.exception("internal error on worker %r's stream", session.name)
            reason = f"internal error: {type(exc).__name__}"
            failure.append(
                _Abort(
                    grpc.StatusCode.INTERNAL,
                    "the coordinator failed to handle this worker's message; see its log",
                )
            )
        finally:
            inbox.release()
            session.close(reason)

    async def _watch(self, session: WorkerSession, inbox: Inbox) -> None:
        """Close a session whose worker has been silent for longer than the heartbeat timeout,
        or whose upload has made no progress for the upload timeout (or crawls)."""
        timeout = self.config.limits.heartbeat_timeout
        upload_timeout = self.config.limits.upload_idle_timeout
        min_rate = self.config.limits.upload_min_rate
        while not session.closed.is_set():
            await asyncio.sleep(min(timeout / 4, upload_timeout / 4, 5.0))
            if time.monotonic() - session.last_seen > timeout:
                log.warning("worker %r silent for %.0f s; dropping it", session.name, timeout)
                session.close("heartbeat timeout")
            elif inbox.stalled_for() > upload_timeout:
                log.warning(
                    "worker %r stalled for %.0f s in the middle of an upload; dropping it so "
                    "other uploads can go on",
                    session.name,
                    upload_timeout,
                )
                session.close("upload stalled")
            elif (rate := inbox.too_slow(min_rate, upload_timeout)) is not None:
                log.warning(
                    "worker %r uploads at %.0f B/s, below --upload-min-rate %.0f B/s; "
                    "dropping it so other uploads and its round can go on",
                    session.name,
                    rate,
                    min_rate,
                )
                session.close("upload too slow")


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")


async def start_grpc_server(
    service: CoordinatorService,
    listen: str,
    extra: Sequence[Callable[[grpc.aio.Server], None]] = (),
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """Start a grpc.aio server with the Join service and gRPC health checking (and whatever
    ``extra`` registers, e.g. the Analytics service); return the server, its health servicer
    and the bound port."""
    limit = max_message_bytes(service.config.limits.chunk_bytes)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=max_concurrent_rpcs(service.config.limits),
        options=[
            *grpc_limit_options(service.config.limits),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            EXCLUSIVE_BIND,
            # How far a worker may send ahead of the folds (fedcore.flow_control).
            *server_flow_control(service.config.limits.stream_window),
        ],
    )
    server.add_generic_rpc_handlers((service.rpc_handler(),))
    for register in extra:
        register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    tls = service.config.security.tls
    try:
        if tls is not None:
            port = server.add_secure_port(listen, tls.credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise bind_failure(listen, str(exc)) from None
    if port == 0:
        raise bind_failure(listen, "address in use or invalid")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health, port
