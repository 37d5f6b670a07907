"""Connected workers: one :class:`WorkerSession` per stream, an explicit state machine each.

::

    JOINING ──▶ IDLE ◀──▶ BUSY
       │          │         │
       └──────────┴─────────┴──▶ CLOSED

A session is BUSY from the moment a task is assigned until its result (or error) arrives,
even if the round that asked for it has already ended: a late result is then discarded and
the worker becomes IDLE again, ready for the next round.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fedcore.strategy import WorkerInfo
from fedcore.v1 import fedcore_pb2 as pb

from .payloads import WeightsPayload

__all__ = ["Outgoing", "SessionState", "Ticket", "WorkerRegistry", "WorkerSession"]

log = logging.getLogger("fedcore.server")

# What the writer of a stream sends: a message, bytes already serialized, weights to stream
# as chunks, or None to end the stream.
Outgoing = pb.CoordinatorMessage | bytes | WeightsPayload | None


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


@dataclass(eq=False)
class Ticket:
    """One task given to one worker; resolved exactly once."""

    task_id: str
    round_number: int
    kind: int  # pb.TaskKind
    session: WorkerSession
    future: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # The round's collector (a FitCollector or EvaluateCollector) that takes the result.
    collector: Any = None
    # Set when the round that asked for it has ended; its result will be dropped.
    stale: bool = False

    def resolve(self, value: object) -> None:
        if not self.future.done():
            self.future.set_result(value)


class WorkerSession:
    """The coordinator's view of one connected worker."""

    def __init__(self, worker_id: str, hello: pb.Hello, peer: str) -> None:
        self.worker_id = worker_id
        self.name = hello.name
        self.num_examples = int(hello.num_examples)
        self.capabilities = tuple(hello.capabilities)
        self.peer = peer
        self.state = SessionState.JOINING
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.ticket: Ticket | None = None
        self.last_seen = time.monotonic()
        self.closed = asyncio.Event()

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, self.name, self.num_examples, self.capabilities)

    def transition(self, new: SessionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"worker {self.name!r}: {self.state.value} -> {new.value}")
        self.state = new

    def assign(self, ticket: Ticket) -> None:
        self.transition(SessionState.BUSY)
        self.ticket = ticket

    def finish_ticket(self) -> Ticket | None:
        """Detach the current ticket and become IDLE."""
        ticket, self.ticket = self.ticket, None
        if self.state is SessionState.BUSY:
            self.transition(SessionState.IDLE)
        return ticket

    def send(self, item: Outgoing) -> None:
        if self.state is not SessionState.CLOSED:
            self.outbox.put_nowait(item)

    def close(self, reason: str) -> None:
        """Mark closed, fail the pending ticket, and end the stream's writer."""
        if self.state is SessionState.CLOSED:
            return
        self.transition(SessionState.CLOSED)
        if self.ticket is not None:
            self.ticket.resolve(ConnectionError(f"worker {self.name!r} left: {reason}"))
            self.ticket = None
        self.outbox.put_nowait(None)
        self.closed.set()

    def __repr__(self) -> str:
        return f"WorkerSession({self.name!r}, {self.state.value})"


class WorkerRegistry:
    """All sessions, with a condition to wait until enough workers are idle."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._sessions: dict[str, WorkerSession] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self.changes = 0  # bumped whenever a worker joins or leaves

    def __len__(self) -> int:
        return len(self._sessions)

    def by_name(self, name: str) -> WorkerSession | None:
        for s in self._sessions.values():
            if s.name == name:
                return s
        return None

    def get(self, worker_id: str) -> WorkerSession | None:
        return self._sessions.get(worker_id)

    def sessions(self) -> list[WorkerSession]:
        return list(self._sessions.values())

    def idle(self) -> list[WorkerSession]:
        return [s for s in self._sessions.values() if s.state is SessionState.IDLE]

    def new_session(self, hello: pb.Hello, peer: str) -> WorkerSession:
        session = WorkerSession(f"w{next(self._ids)}", hello, peer)
        self._sessions[session.worker_id] = session
        return session

    async def activate(self, session: WorkerSession) -> None:
        session.transition(SessionState.IDLE)
        await self.notify()

    async def remove(self, session: WorkerSession, reason: str) -> None:
        session.close(reason)
        if self._sessions.pop(session.worker_id, None) is not None:
            log.info("worker %r left (%s); %d connected", session.name, reason, len(self))
        await self.notify()

    async def notify(self) -> None:
        self.changes += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, seen: int) -> None:
        """Wait until ``changes`` differs from ``seen`` (a worker joined or left since)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.changes != seen)

    async def wait_for_idle(self, count: int, timeout: float | None) -> bool:
        """Wait until at least ``count`` workers are idle; False on timeout."""

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.idle()) >= count)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close_all(self, reason: str) -> None:
        for s in list(self._sessions.values()):
            s.close(reason)
