"""Both sides refuse a peer that speaks another protocol version with VersionMismatchError:
the coordinator at the hello (test_coordinator), the worker at the welcome (here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer

from fedcore.errors import ProtocolError, VersionMismatchError
from fedcore.protocol import (
    PROTOCOL_VERSION,
    SERVICE_NAME,
    check_protocol_version,
    deserialize_worker_message,
    serialize_coordinator_message,
)
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker import Worker


def test_check_protocol_version_names_both_versions() -> None:
    check_protocol_version(PROTOCOL_VERSION, peer="worker", us="coordinator")
    with pytest.raises(VersionMismatchError, match=r"worker speaks fedcore protocol v99") as e:
        check_protocol_version(99, peer="worker", us="coordinator")
    assert isinstance(e.value, ProtocolError)
    assert f"this coordinator speaks v{PROTOCOL_VERSION}" in str(e.value)


async def _fake_coordinator(version: int) -> tuple[grpc.aio.Server, int]:
    """Answers every hello with a welcome claiming ``version``, then a shutdown."""

    async def join(requests: Any, context: Any) -> AsyncIterator[pb.CoordinatorMessage]:
        await context.read()
        yield pb.CoordinatorMessage(
            welcome=pb.Welcome(worker_id="w1", protocol_version=version, chunk_bytes=1024)
        )
        yield pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="done"))

    handler = grpc.stream_stream_rpc_method_handler(
        join,
        request_deserializer=deserialize_worker_message,
        response_serializer=serialize_coordinator_message,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Join": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize("version", [PROTOCOL_VERSION, PROTOCOL_VERSION + 1])
async def test_a_worker_stops_at_a_welcome_of_another_protocol_version(version: int) -> None:
    server, port = await _fake_coordinator(version)
    worker = Worker(f"127.0.0.1:{port}", "w", ScriptedTrainer(0.0, 1), give_up_after=TIMEOUT)
    try:
        if version == PROTOCOL_VERSION:  # control: the same harness, a matching version
            await asyncio.wait_for(worker.run(), TIMEOUT)
            assert worker.worker_id == "w1"
        else:
            with pytest.raises(VersionMismatchError, match="the coordinator speaks fedcore"):
                await asyncio.wait_for(worker.run(), TIMEOUT)
            assert worker.worker_id is None
    finally:
        await server.stop(None)
