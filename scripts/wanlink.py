"""An emulated wide-area link: a user-space asyncio TCP proxy that delays and rate-limits bytes.

The kernel here has no netem, so each silo of a WAN benchmark dials its own :class:`Link`, which
forwards every connection to the coordinator through two :class:`Pipe` s, one per direction.
A pipe serialises bytes at its rate (a token bucket whose depth is one read, at most
``READ_BYTES``), then holds each read for the one-way delay before writing it on. It buffers at
most ``Direction.capacity`` bytes: the bytes on the wire (rate x delay) plus a router's queue.
It reads from its source only while it has room and counts bytes as gone only once the
destination took them, so TCP's and HTTP/2's flow control stay end to end: a receiver that
stops reading stalls the sender, as on a real link, instead of filling the proxy.

The proxy's own sockets get small kernel buffers (``SOCKET_BUFFER_BYTES``) for the same reason:
bytes hidden in them would be an unmodelled queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "READ_BYTES",
    "SOCKET_BUFFER_BYTES",
    "Direction",
    "Link",
    "LinkSpec",
    "PipeStats",
    "TokenBucket",
]

# The granularity of the emulation: one read is timed as a whole (0.5 ms at 1 Gbit/s, 5 ms at
# 100 Mbit/s), and the event loop's timer adds about a millisecond.
READ_BYTES = 64 * 1024
SOCKET_BUFFER_BYTES = 64 * 1024
_QUEUE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Direction:
    """One direction of a link."""

    delay_s: float
    """One-way propagation delay, in seconds."""
    rate_bps: float
    """Bits per second (``math.inf``: no limit)."""
    queue_bytes: int = _QUEUE_BYTES
    """A router's queue in front of the wire, in bytes."""

    @property
    def capacity(self) -> int:
        """The most bytes the pipe holds: those on the wire plus the queue."""
        wire = 0 if math.isinf(self.rate_bps) else math.ceil(self.rate_bps / 8 * self.delay_s)
        return wire + self.queue_bytes + READ_BYTES


@dataclass(frozen=True)
class LinkSpec:
    """A silo's link: ``up`` carries silo -> coordinator, ``down`` coordinator -> silo."""

    up: Direction
    down: Direction

    @classmethod
    def symmetric(cls, rtt_s: float, rate_bps: float) -> LinkSpec:
        """Half the round trip each way, the same rate both ways."""
        direction = Direction(delay_s=rtt_s / 2, rate_bps=rate_bps)
        return cls(up=direction, down=direction)


class TokenBucket:
    """Rate limiting as a token bucket (the generic cell rate algorithm, its virtual-clock
    form): :meth:`departure` is when ``size`` bytes offered at ``now`` have left at ``rate``."""

    def __init__(self, rate_bps: float, burst_bytes: int) -> None:
        self._seconds_per_byte = 0.0 if math.isinf(rate_bps) else 8.0 / rate_bps
        self._burst_s = burst_bytes * self._seconds_per_byte
        self._free_at = -math.inf

    def departure(self, size: int, now: float) -> float:
        self._free_at = max(self._free_at, now - self._burst_s) + size * self._seconds_per_byte
        return max(self._free_at, now)


@dataclass
class PipeStats:
    """What one direction of a link carried."""

    capacity: int
    bytes: int = 0
    peak_buffered: int = 0
    connections: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the pipe held ``capacity`` bytes (it then stops reading its source)."""


_EOF = b""


class Pipe:
    """One direction of one proxied connection."""

    def __init__(self, spec: Direction, stats: PipeStats) -> None:
        self._spec = spec
        self._stats = stats
        self._bucket = TokenBucket(spec.rate_bps, READ_BYTES)
        self._held: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._changed = asyncio.Condition()

    async def run(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Carry ``source`` to ``sink`` until the source ends (then half-close the sink)."""
        async with asyncio.TaskGroup() as group:  # one side failing cancels the other
            group.create_task(self._take(source))
            group.create_task(self._give(sink))

    async def _take(self, source: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        capacity = self._spec.capacity
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._buffered < capacity)
                room = capacity - self._buffered
            data = await source.read(min(READ_BYTES, room))
            due = self._bucket.departure(len(data), loop.time()) + self._spec.delay_s
            async with self._changed:
                self._held.append((due, data))
                self._buffered += len(data)
                self._stats.peak_buffered = max(self._stats.peak_buffered, self._buffered)
                if self._buffered >= capacity:
                    self._stats.full.set()
                self._changed.notify_all()
            if not data:
                return

    async def _give(self, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._held))
                due, _ = self._held[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Everything due by now goes in one write.
            batch: list[bytes] = []
            now = loop.time()
            async with self._changed:
                while self._held and self._held[0][0] <= now:
                    batch.append(self._held.popleft()[1])
            ended = batch[-1] == _EOF
            sent = sum(len(b) for b in batch)
            if sent:
                sink.writelines(b for b in batch if b)
                await sink.drain()
            async with self._changed:
                self._buffered -= sent
                self._stats.bytes += sent
                self._changed.notify_all()
            if ended:
                if sink.can_write_eof():
                    sink.write_eof()
                return


def _small_buffers(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)


@dataclass
class Link:
    """A listening proxy in front of ``upstream`` (host, port) with the given link."""

    upstream: tuple[str, int]
    spec: LinkSpec
    up: PipeStats = field(init=False)
    down: PipeStats = field(init=False)
    _server: asyncio.Server | None = field(init=False, default=None)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.up = PipeStats(capacity=self.spec.up.capacity)
        self.down = PipeStats(capacity=self.spec.down.capacity)

    async def start(self, host: str = "127.0.0.1") -> int:
        """Listen on ``host`` and a free port; return the port."""
        self._server = await asyncio.start_server(self._accept, host, 0, limit=READ_BYTES)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Link.close cancels this task: end quietly (asyncio logs a connection callback that
        # ends cancelled as an error).
        with contextlib.suppress(asyncio.CancelledError):
            await self._carry(reader, writer)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            _small_buffers(writer)
            upstream_reader, upstream_writer = await asyncio.open_connection(
                *self.upstream, limit=READ_BYTES
            )
            _small_buffers(upstream_writer)
            self.up.connections += 1
            self.down.connections += 1
            async with asyncio.TaskGroup() as group:
                group.create_task(Pipe(self.spec.up, self.up).run(reader, upstream_writer))
                group.create_task(Pipe(self.spec.down, self.down).run(upstream_reader, writer))
        except* (ConnectionError, OSError):
            pass  # either end went away: so does the other (closed below)
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(ConnectionError, OSError):
                        await w.wait_closed()
