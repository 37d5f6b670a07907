"""Unread bytes on the coordinator are bounded per stream: N uploads cost N x about one chunk.

A real grpc.aio server with the coordinator's flow-control options reads one message of each
of N streams and then stops reading, as a coordinator busy folding does. Each client dials it
through a counting TCP relay, so the test sees every byte the server's transport accepted:
what arrived but was not read. With the default ``--stream-window`` that stays under
N x (chunk + window + 512 KiB) however much the clients try to send; the positive controls
(a fixed 8 MiB window, and the BDP probing the coordinator used before) let far more in, so
the harness does reach the windows. After the server reads again every byte arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from fedcore.flow_control import DEFAULT_STREAM_WINDOW, server_flow_control
from fedcore.protocol import STREAM_END

CHUNK = 1024 * 1024
STREAMS = 6
MESSAGES = 16  # per stream: far more than any window in the default
BOUND = STREAMS * (CHUNK + DEFAULT_STREAM_WINDOW + 512 * 1024)
METHOD = "/fedcore.test.Window/Upload"
# A relay that forwarded nothing new for this long has met the windows.
QUIET_S = 0.5
DEADLINE_S = 20.0
_LIMITS = [
    ("grpc.max_receive_message_length", 2 * CHUNK),
    ("grpc.max_send_message_length", 2 * CHUNK),
]


class _Relay:
    """A TCP relay to ``port`` counting the bytes it delivered to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.delivered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool
    ) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                    if count:
                        self.delivered += len(data)
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for pipe in (self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop relaying; every pipe task ends before the test does."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def start(self) -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    async def settled(self) -> int:
        """The bytes delivered once nothing more got through for QUIET_S (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        last, since = -1, loop.time()
        while loop.time() < deadline:
            if self.delivered != last:
                last, since = self.delivered, loop.time()
            elif loop.time() - since >= QUIET_S:
                return last
            await asyncio.sleep(0.05)
        return self.delivered


async def _run(options: list[tuple[str, int]]) -> tuple[int, list[int]]:
    """Bytes the server accepted while it read one message per stream; then what each stream
    delivered in the end."""
    first_read = asyncio.Semaphore(0)
    resume = asyncio.Event()

    async def upload(request_iterator: Any, context: Any) -> AsyncIterator[bytes]:
        got = len(await context.read())
        first_read.release()
        await resume.wait()  # "folding": nothing read, so nothing may pile up past the window
        while (message := await context.read()) is not STREAM_END:
            got += len(message)
        yield got.to_bytes(8, "big")

    server = grpc.aio.server(options=[*_LIMITS, *options])
    handler = grpc.stream_stream_rpc_method_handler(upload)
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay = _Relay(port)
    listener, relay_port = await relay.start()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}", options=_LIMITS)
        for _ in range(STREAMS)
    ]
    try:

        async def send(channel: grpc.aio.Channel) -> int:
            call: Any = channel.stream_stream(METHOD, None, None)(None)
            for _ in range(MESSAGES):
                await call.write(bytes(CHUNK))
            await call.done_writing()
            return int.from_bytes(await call.read(), "big")

        calls = [asyncio.create_task(send(c)) for c in channels]
        for _ in range(STREAMS):
            await asyncio.wait_for(first_read.acquire(), DEADLINE_S)
        unread = await relay.settled()
        resume.set()
        totals = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE_S)
        return unread, totals
    finally:
        for channel in channels:
            await channel.close(None)
        listener.close()
        await relay.close()
        await listener.wait_closed()
        await server.stop(None)


async def test_unread_bytes_stay_under_a_chunk_per_stream() -> None:
    unread, totals = await _run(server_flow_control())
    assert totals == [MESSAGES * CHUNK] * STREAMS  # the harness delivers everything
    assert STREAMS * CHUNK <= unread < BOUND


Options = Callable[[], list[tuple[str, int]]]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(lambda: server_flow_control(8 * 1024 * 1024), id="window-8MiB"),
        pytest.param(lambda: [("grpc.http2.bdp_probe", 1)], id="bdp-probing"),
    ],
)
async def test_positive_control_larger_windows_let_more_in(options: Options) -> None:
    unread, totals = await _run(options())
    assert totals == [MESSAGES * CHUNK] * STREAMS
    assert unread > BOUND
