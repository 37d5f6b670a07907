"""The worker's end of the ``Join`` stream, typed: what it reads is a coordinator message, a
payload chunk (zero-copy), or None when the stream has ended."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from fedcore.codec import RawChunk
from fedcore.protocol import (
    JOIN_METHOD,
    STREAM_END,
    deserialize_coordinator_message,
    serialize_worker_message,
)
from fedcore.v1 import fedcore_pb2 as pb

if TYPE_CHECKING:
    from grpc.aio import StreamStreamCall

    JoinCall = StreamStreamCall[pb.WorkerMessage | bytes, pb.CoordinatorMessage | RawChunk]

__all__ = ["JoinStream"]


class JoinStream:
    """One ``Join`` call on ``channel`` (with ``metadata``, e.g. the enrollment token)."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> None:
        open_stream = channel.stream_stream(
            JOIN_METHOD,
            request_serializer=serialize_worker_message,
            response_deserializer=deserialize_coordinator_message,
        )
        self._call: JoinCall = open_stream(None, metadata=metadata)

    async def read(self) -> pb.CoordinatorMessage | RawChunk | None:
        """The next message; None once the coordinator has ended the stream."""
        message = await self._call.read()
        if message is STREAM_END:
            return None
        # The deserializer yields nothing else; anything else is a bug worth stopping on.
        assert isinstance(message, pb.CoordinatorMessage | RawChunk), type(message)
        return message

    async def write(self, message: pb.WorkerMessage | bytes) -> None:
        """Send a message, or one already serialized (payload chunks)."""
        await self._call.write(message)

    def cancel(self) -> None:
        """End the call (the coordinator sees the stream close)."""
        self._call.cancel()
