"""The WAN benchmark's emulated link (scripts/wanlink.py): bytes intact, delay and rate within
generous bounds over localhost, bounded buffering and backpressure from a receiver that stops
reading. No exact timings: the machine is shared; bounds are loose on the slow side."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from wanlink import Direction, Link, LinkSpec, TokenBucket


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


class _Upstream:
    """A localhost server: echoes, or (``sink``) accepts and reads only when told."""

    def __init__(self, sink: bool = False) -> None:
        self.sink = sink
        self.readers: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.sink:
            await self.readers.put(reader)
        else:
            await _echo(reader, writer)


Factory = Callable[..., Awaitable[tuple[_Upstream, Link, int]]]


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Factory]:
    """Makes (upstream server, link in front of it, the link's port); closes them all."""
    made: list[tuple[asyncio.Server, _Upstream, Link]] = []

    async def make(spec: LinkSpec, sink: bool = False) -> tuple[_Upstream, Link, int]:
        up = _Upstream(sink)
        server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        link = Link(("127.0.0.1", server.sockets[0].getsockname()[1]), spec)
        made.append((server, up, link))
        return up, link, await link.start()

    yield make
    for server, up, link in made:
        await link.close()
        for writer in up.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    elapsed = time.perf_counter() - started
    writer.close()
    return got, elapsed


def test_token_bucket_spaces_departures_at_the_rate() -> None:
    bucket = TokenBucket(8e6, burst_bytes=0)  # 1 MB/s
    assert bucket.departure(1000, 0.0) == pytest.approx(0.001)
    assert bucket.departure(1000, 0.0) == pytest.approx(0.002)  # queued behind the first
    assert bucket.departure(1000, 10.0) == pytest.approx(10.001)  # idle: no credit saved up
    burst = TokenBucket(8e6, burst_bytes=5000)
    assert burst.departure(5000, 1.0) == pytest.approx(1.0)  # a full bucket leaves at once
    assert burst.departure(1000, 1.0) == pytest.approx(1.001)
    assert TokenBucket(math.inf, 0).departure(10**9, 3.0) == 3.0


async def test_bytes_cross_intact_both_ways(upstream_factory: Factory) -> None:
    """Positive control: the harness reaches the echo server through the link."""
    _, link, port = await upstream_factory(LinkSpec.symmetric(0.002, 1e9))
    payload = os.urandom(3_000_000)
    got, _ = await _roundtrip(port, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert link.up.bytes == link.down.bytes == len(payload)
    assert link.up.connections == 1


async def test_round_trip_pays_both_delays(upstream_factory: Factory) -> None:
    _, _, direct_port = await upstream_factory(LinkSpec.symmetric(0.0, math.inf))
    _, _, port = await upstream_factory(LinkSpec.symmetric(0.2, math.inf))
    _, direct = await _roundtrip(direct_port, b"ping")
    _, delayed = await _roundtrip(port, b"ping")
    assert 0.19 <= delayed < 0.2 + 1.5, delayed
    assert direct < 0.1, direct


async def test_rate_limits_each_direction(upstream_factory: Factory) -> None:
    # 1 MB up at 16 Mbit/s (0.5 s), then 1 MB back at 16 Mbit/s (another 0.5 s, pipelined with
    # the first, so about 0.5-1.0 s in all); the link without a limit: a few milliseconds.
    rate = 16e6
    slow = LinkSpec(up=Direction(0.0, rate), down=Direction(0.0, rate))
    _, link, port = await upstream_factory(slow)
    _, _, fast_port = await upstream_factory(LinkSpec.symmetric(0.0, math.inf))
    payload = os.urandom(1_000_000)
    _, fast = await _roundtrip(fast_port, payload)
    _, limited = await _roundtrip(port, payload)
    one_way = len(payload) * 8 / rate
    assert one_way * 0.9 <= limited < 2 * one_way + 3.0, limited
    assert fast < one_way / 2, fast
    assert link.down.bytes == len(payload)


async def test_a_receiver_that_stops_reading_stalls_the_sender(upstream_factory: Factory) -> None:
    """Backpressure: the link holds at most its capacity, the rest stays with the sender (its
    socket buffer and its own write buffer); reading again delivers every byte, in order."""
    spec = LinkSpec.symmetric(0.01, 1e9)
    upstream, link, port = await upstream_factory(spec, sink=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(16 * 1024 * 1024)
    writer.write(payload)
    sink = await asyncio.wait_for(upstream.readers.get(), 10)
    drained = asyncio.ensure_future(writer.drain())
    await asyncio.wait_for(link.up.full.wait(), 20)  # the link filled up and stopped reading
    assert link.up.peak_buffered <= link.up.capacity
    assert link.up.bytes < 6 * 1024 * 1024, link.up.bytes  # the sink took only what fits
    assert writer.transport.get_write_buffer_size() > 8 * 1024 * 1024
    assert not drained.done()
    got = await asyncio.wait_for(sink.readexactly(len(payload)), 60)
    await asyncio.wait_for(drained, 10)
    assert got == payload
    assert link.up.peak_buffered <= link.up.capacity
    writer.close()
    del reader


def test_the_physical_floor_is_set_by_the_slowest_link() -> None:
    import bench_wan

    even = bench_wan.Net(50.0, (100.0,) * 8)
    straggler = bench_wan.Net(50.0, (10.0, *(100.0,) * 7))
    # 10 MB down and up at 100 Mbit/s (0.8 s each) plus one round trip of 50 ms (half of it
    # for the task's last byte, half for the result's).
    assert even.physical_floor(10_000_000) == pytest.approx(1.65)
    assert straggler.physical_floor(10_000_000) == pytest.approx(16.05)
    args = bench_wan.build_parser().parse_args(
        ["--workers", "8", "--sizes", "2.5e6", "--straggler-mbit", "10"]
    )
    assert bench_wan.grid(args) == [
        bench_wan.Point(8, 2_500_000, even),
        bench_wan.Point(8, 2_500_000, straggler),
    ]
