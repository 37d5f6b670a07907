"""Connected workers: one :class:`WorkerSession` per stream, an explicit state machine each.

::

    JOINING ──▶ IDLE ◀──▶ BUSY
       │          │         │
       └──────────┴─────────┴──▶ CLOSED

Workers are *selectable* when their advertised dataset carries every tag the federation
requires (``--require-tag``); the others stay connected and listed, but are never idle for
a round: they are never selected.

A session is BUSY from the moment a task is assigned until its result (or error) arrives,
even if the round that asked for it has already ended: a late result is then discarded and
the worker becomes IDLE again, ready for the next round. A worker whose owner allows it
(``[jobs] max-tasks``, announced in its hello) may hold several tasks at once, of different
jobs: a standing network's jobs offer it a task while it holds fewer than its bound, capped
at :data:`MAX_TASKS_PER_WORKER` since the number is the worker's claim
(:meth:`WorkerSession.can_take`); it is BUSY while it holds any. A one-shot federation's
rounds select IDLE workers only, one task each. Every transition wakes whoever waits
on the registry (:meth:`WorkerRegistry.wait_for_idle`), so a straggler that finishes after its
round's deadline is available to the next round at once.

A :class:`Ticket` is one task given to one worker; the round's :class:`Collector` takes its
result. The collectors live in the round engine; this module only names what the transport
calls on them.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from fedcore.codec import ChunkLike
from fedcore.data.metadata import DatasetMetadata
from fedcore.strategy import WorkerInfo
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights

__all__ = [
    "MAX_TASKS_PER_WORKER",
    "QUIET_AFTER",
    "ChunkStream",
    "Collector",
    "Outgoing",
    "PayloadGate",
    "SessionState",
    "Ticket",
    "UploadSink",
    "WorkerRegistry",
    "WorkerSession",
    "crowd_level",
]

log = logging.getLogger("fedcore.server")

#: Joins and departures are logged one line each while at most this many workers are
#: connected; beyond, at DEBUG (100 simulated clients would print 200 lines): the roster
#: before round 1 and the status line count them.
QUIET_AFTER = 10
#: The most tasks a coordinator gives one worker at once, whatever its hello claims: each
#: task's payload, upload and secure round cost the coordinator too.
MAX_TASKS_PER_WORKER = 8


def crowd_level(connected: int) -> int:
    """The log level of one worker's join or departure with ``connected`` workers."""
    return logging.INFO if connected <= QUIET_AFTER else logging.DEBUG


class ChunkStream(Protocol):
    """Weights to stream after a Task, serialized chunk by chunk as the stream sends them
    (:class:`fedcore.server.transport.payloads.WeightsPayload`)."""

    def messages(self) -> Iterator[bytes]:
        """Serialized ``CoordinatorMessage(chunk=...)`` messages, in order."""
        ...


class PayloadGate:
    """Queued in a session's outbox (:meth:`WorkerSession.hold`): what was queued after it
    waits until it opens, while urgent messages still go. A secure round's model waits so for
    the worker's key directory: once bytes of the model are in the link, nothing overtakes them.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        """Let what follows go (idempotent)."""
        if not self._open:
            self._open = True
            self._wake()


# What the writer of a stream sends: a message, bytes already serialized, weights to stream
# as chunks, or None to end the stream.
Outgoing = pb.CoordinatorMessage | bytes | ChunkStream | None
# Digests a hello may list (a worker needs one per model it serves).
_MAX_FROZEN_HELD = 64
# Queued to wake the writer when an urgent message is waiting; never written.
_WAKE = b""


class SessionState(enum.Enum):
    JOINING = "joining"
    IDLE = "idle"
    BUSY = "busy"
    CLOSED = "closed"


_ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    SessionState.JOINING: frozenset({SessionState.IDLE, SessionState.CLOSED}),
    SessionState.IDLE: frozenset({SessionState.BUSY, SessionState.CLOSED}),
    SessionState.BUSY: frozenset({SessionState.IDLE, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A session was asked to make a move its state machine forbids (a bug, not bad input)."""


class UploadSink(Protocol):
    """An update folded into the round's aggregate as its chunks arrive (streaming
    aggregation, server/transport/upload_stream.py); its ``add`` runs in a worker thread."""

    expected_chunks: int

    def add(self, chunk: ChunkLike) -> None:
        """Check and fold the next chunk (raises PayloadError on a bad one)."""
        ...

    def abort(self) -> None:
        """Take back, exactly, everything folded so far."""
        ...


class Collector(Protocol):
    """Takes the results of one round's tickets (the round engine's collectors).

    The inbox calls it for every result or error that arrives on a ticket it still holds;
    ``update`` is None for results that carry no update (evaluation).
    """

    @property
    def update_signature(self) -> ModelSignature | None:
        """The signature an update must have (None: the model's own)."""
        ...

    def check_result(self, result: pb.TaskResult) -> None:
        """Refuse a result whose envelope breaks the protocol (raises ProtocolError)."""
        ...

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Take one validated result."""
        ...

    def fail(
        self,
        ticket: Ticket,
        reason: str,
        *,
        refused: bool = False,
        answered: bool = False,
        awaiting: bool = False,
    ) -> None:
        """Record that ``ticket``'s worker did not deliver (``answered``: it said so itself;
        ``awaiting``: its data owner has not decided on the plan yet)."""
        ...

    def open_stream(
        self, ticket: Ticket, result: pb.TaskResult, signature: ModelSignature
    ) -> UploadSink | None:
        """A sink that folds this result's update as it arrives; None: stage it whole."""
        ...

    async def finish_stream(self, ticket: Ticket, result: pb.TaskResult, sink: UploadSink) -> None:
        """Count a fully folded update (or take it back out when the round closed first)."""
        ...


@dataclass(eq=False)
class Ticket:
    """One task given to one worker; resolved exactly once."""

    task_id: str
    round_number: int
    kind: int  # pb.TaskKind
    session: WorkerSession
    # The job the task belongs to ("": a one-shot federation's).
    job_id: str = ""
    future: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # The round's collector that takes the result; None once the round has closed.
    collector: Collector | None = None
    # Set when the round that asked for it has ended; its result will be dropped.
    stale: bool = False
    # Holds the task's payload on the stream until the round opens it (a secure round).
    gate: PayloadGate | None = None

    def resolve(self, value: object) -> None:
        if not self.future.done():
            self.future.set_result(value)


class WorkerSession:
    """The coordinator's view of one connected worker."""

    def __init__(
        self,
        worker_id: str,
        hello: pb.Hello,
        peer: str,
        identity: str | None = None,
        require_tags: tuple[str, ...] = (),
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.name = hello.name
        # The name its token or certificate proved (None when authentication is off).
        self.identity = identity
        self.num_examples = int(hello.num_examples)
        self.capabilities = tuple(hello.capabilities)
        self.dataset = (
            DatasetMetadata.from_proto(hello.dataset) if hello.HasField("dataset") else None
        )
        #: The required tags it lacks (empty: it can be selected).
        self.missing_tags = tuple(
            t for t in require_tags if self.dataset is None or t not in self.dataset.tags
        )
        self.peer = peer
        # Frozen parameters the worker holds (by digest): plans do not attach them again.
        self.frozen_held: set[str] = set(hello.frozen_sha256[:_MAX_FROZEN_HELD])
        # The model it was started for ("" when any): a standing network's jobs select by it.
        self.model_name = hello.model.name[:256] if hello.HasField("model") else ""
        # Its owner's [release] model policy (a standing network judges pulls by it).
        self.release_model = hello.release_model[:16] or "allowed"
        # How many tasks (of different jobs) it may hold at once: its claim, capped.
        self.max_tasks = min(max(hello.max_tasks, 1), MAX_TASKS_PER_WORKER)
        self.state = SessionState.JOINING
        # What the writer sends, in order; a PayloadGate holds what follows it.
        self.outbox: asyncio.Queue[Outgoing | PayloadGate] = asyncio.Queue()
        # Small control messages (secure aggregation) that overtake queued payload chunks.
        self.urgent: collections.deque[pb.CoordinatorMessage] = collections.deque()
        # The gate the writer waits at (None: none), and what wakes it there.
        self._held: PayloadGate | None = None
        self._signal = asyncio.Event()
        # The tasks it holds, by task id: at most ``max_tasks``, of different jobs.
        self.tickets: dict[str, Ticket] = {}
        self.last_seen = time.monotonic()
        self.closed = asyncio.Event()
        self._on_change = on_change

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.worker_id, self.name, self.num_examples, self.capabilities, self.dataset
        )

    @property
    def selectable(self) -> bool:
        """Whether rounds may select it (it has every required tag)."""
        return not self.missing_tags

    def transition(self, new: SessionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"worker {self.name!r}: {self.state.value} -> {new.value}")
        self.state = new
        self._changed()

    def can_take(self, job_id: str) -> bool:
        """Whether a task of ``job_id`` may be given now: the session is open, holds fewer
        tasks than its bound and none of that job."""
        if self.state not in (SessionState.IDLE, SessionState.BUSY):
            return False
        held = self.tickets.values()
        return len(self.tickets) < self.max_tasks and all(t.job_id != job_id for t in held)

    def assign(self, ticket: Ticket) -> None:
        if self.state is SessionState.BUSY:
            if not self.can_take(ticket.job_id):
                raise IllegalTransition(f"worker {self.name!r} cannot take another task now")
            self.tickets[ticket.task_id] = ticket
            self._changed()
            return
        self.transition(SessionState.BUSY)
        self.tickets[ticket.task_id] = ticket

    def ticket(self, task_id: str) -> Ticket | None:
        """The task ``task_id`` it holds, if any."""
        return self.tickets.get(task_id)

    def finish_ticket(self, task_id: str) -> Ticket | None:
        """Detach ticket ``task_id``; IDLE once it holds none."""
        ticket = self.tickets.pop(task_id, None)
        if self.state is SessionState.BUSY:
            if self.tickets:
                self._changed()  # room for another job's task
            else:
                self.transition(SessionState.IDLE)
        return ticket

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def send(self, item: Outgoing | PayloadGate) -> None:
        if self.state is not SessionState.CLOSED:
            self.outbox.put_nowait(item)

    def send_urgent(self, message: pb.CoordinatorMessage) -> None:
        """Send ``message`` before whatever is queued (between two chunks of a payload)."""
        if self.state is not SessionState.CLOSED:
            self.urgent.append(message)
            self.outbox.put_nowait(_WAKE)
            self._signal.set()

    def hold(self) -> PayloadGate:
        """Queue a gate: what is queued after it waits until it opens."""
        gate = PayloadGate(self._signal.set)
        self.send(gate)
        return gate

    async def next_outgoing(self) -> Outgoing:
        """What the stream's writer sends next: urgent messages first, then the outbox (up
        to a closed gate; None once the session closed while the writer waited there)."""
        while True:
            if self.urgent:
                return self.urgent.popleft()
            held = self._held
            if held is not None:
                if self.state is SessionState.CLOSED:
                    return None
                if not held.is_open:
                    # Nothing can be missed between the checks and the wait: one loop.
                    self._signal.clear()
                    await self._signal.wait()
                    continue
                self._held = None
            item = await self.outbox.get()
            if isinstance(item, PayloadGate):
                self._held = item
            elif item is not _WAKE:
                return item

    def close(self, reason: str) -> None:
        """Mark closed, fail the pending ticket, and end the stream's writer."""
        if self.state is SessionState.CLOSED:
            return
        self.transition(SessionState.CLOSED)
        tickets, self.tickets = self.tickets, {}
        for ticket in tickets.values():
            ticket.resolve(ConnectionError(f"worker {self.name!r} left: {reason}"))
        self.outbox.put_nowait(None)
        self._signal.set()
        self.closed.set()

    def __repr__(self) -> str:
        return f"WorkerSession({self.name!r}, {self.state.value})"


class WorkerPool(Protocol):
    """What round engines select workers from: the whole registry, or a job's share of it
    (``server/jobs/workers.py``)."""

    @property
    def changes(self) -> int: ...

    def sessions(self) -> list[WorkerSession]: ...

    def idle(self) -> list[WorkerSession]: ...

    async def wait_for_change(self, seen: int) -> None: ...

    async def wait_for_idle(self, count: int, timeout: float | None) -> bool: ...


class WorkerRegistry:
    """All sessions, with a condition to wait until enough workers are idle."""

    def __init__(self, require_tags: tuple[str, ...] = ()) -> None:
        self.require_tags = require_tags
        self._sessions: dict[str, WorkerSession] = {}
        self._ids = itertools.count(1)
        # Replaced by a fresh event at every change: set() wakes every waiter of the old one.
        self._changed = asyncio.Event()
        self.changes = 0  # bumped whenever a session changes state, joins or leaves

    def __len__(self) -> int:
        return len(self._sessions)

    def by_name(self, name: str) -> WorkerSession | None:
        for s in self._sessions.values():
            if s.name == name:
                return s
        return None

    def sessions(self) -> list[WorkerSession]:
        return list(self._sessions.values())

    def idle(self) -> list[WorkerSession]:
        """Sessions ready for a task that rounds may select (see ``selectable``)."""
        return [s for s in self._sessions.values() if s.state is SessionState.IDLE and s.selectable]

    def new_session(self, hello: pb.Hello, peer: str, identity: str | None = None) -> WorkerSession:
        session = WorkerSession(
            f"w{next(self._ids)}", hello, peer, identity, self.require_tags, self.notify
        )
        self._sessions[session.worker_id] = session
        return session

    async def activate(self, session: WorkerSession) -> None:
        session.transition(SessionState.IDLE)

    async def remove(self, session: WorkerSession, reason: str) -> None:
        session.close(reason)
        if self._sessions.pop(session.worker_id, None) is not None:
            log.log(
                crowd_level(len(self)),
                "worker %r left (%s); %d connected",
                session.name,
                reason,
                len(self),
                extra={"event": "worker_left", "worker": session.name, "reason": reason},
            )
        self.notify()

    def notify(self) -> None:
        """Wake every waiter: a session changed state, joined or left."""
        self.changes += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, seen: int) -> None:
        """Wait until ``changes`` differs from ``seen`` (some session changed since)."""
        while self.changes == seen:
            await self._changed.wait()

    async def wait_for_idle(self, count: int, timeout: float | None) -> bool:
        """Wait until at least ``count`` workers are idle; False on timeout."""

        async def wait() -> None:
            while len(self.idle()) < count:
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return False
        return True
