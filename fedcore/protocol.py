"""Constants of the fedcore v1 protocol and the (de)serializers both sides register.

The coordinator encodes the global weights' chunk messages once per round and writes the same
bytes to every worker (``server/transport/payloads.py``), so its serializer passes ``bytes``
through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from fedcore.codec import (
    CHUNK_FIELD_IN_COORDINATOR_MESSAGE,
    CHUNK_FIELD_IN_WORKER_MESSAGE,
    RawChunk,
    decode_chunk_message,
)
from fedcore.errors import VersionMismatchError
from fedcore.v1 import fedcore_pb2 as pb

__all__ = [
    "ANALYTICS_CAPABILITY",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MODEL_BYTES",
    "JOIN_METHOD",
    "MESSAGE_OVERHEAD_BYTES",
    "PROTOCOL_VERSION",
    "SECAGG_CAPABILITY",
    "SERVICE_NAME",
    "STREAM_END",
    "Undecodable",
    "check_protocol_version",
    "deserialize_coordinator_message",
    "deserialize_worker_message",
    "max_message_bytes",
    "serialize_coordinator_message",
    "serialize_worker_message",
]

PROTOCOL_VERSION = 1
# What grpc.aio returns from read() once the peer has closed its side of the stream.
STREAM_END: Final[Any] = grpc.aio.EOF  # type: ignore[attr-defined]
#: Capability a worker announces in its hello when it can run secure aggregation.
SECAGG_CAPABILITY = "secagg-v1"
#: Capability of a worker that serves a table for federated-analytics queries.
ANALYTICS_CAPABILITY = "analytics-v1"
JOIN_METHOD = "/fedcore.v1.Coordinator/Join"


def check_protocol_version(theirs: int, *, peer: str, us: str) -> None:
    """Refuse a peer that speaks another protocol version (its hello or welcome said
    ``theirs``) with :class:`~fedcore.errors.VersionMismatchError`."""
    if theirs != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"{peer} speaks fedcore protocol v{theirs}, this {us} speaks v{PROTOCOL_VERSION}; "
            "install a matching fedcore version on both sides"
        )


SERVICE_NAME = "fedcore.v1.Coordinator"

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_MODEL_BYTES = 4 * 1024**3
# Room for everything in a message besides a chunk's data (headers, specs of many tensors).
MESSAGE_OVERHEAD_BYTES = 1024 * 1024


def max_message_bytes(chunk_bytes: int) -> int:
    """The gRPC message size limit that fits one chunk plus its envelope."""
    return chunk_bytes + MESSAGE_OVERHEAD_BYTES


@dataclass(frozen=True)
class Undecodable:
    """Bytes that are not a valid message: handed to the stream handler (instead of failing
    inside gRPC with a bare INTERNAL) so it can end the stream with a clear error."""

    size: int
    reason: str

    def describe(self) -> str:
        return (
            f"a {self.size}-byte message is not a valid fedcore v1 WorkerMessage "
            f"({self.reason}); the worker and coordinator must run matching fedcore versions"
        )


def deserialize_worker_message(raw: bytes) -> pb.WorkerMessage | RawChunk | Undecodable:
    """Parse a worker message; payload chunks take a zero-copy fast path."""
    chunk = decode_chunk_message(raw, CHUNK_FIELD_IN_WORKER_MESSAGE)
    if chunk is not None:
        return chunk
    try:
        return pb.WorkerMessage.FromString(raw)
    except DecodeError as exc:
        return Undecodable(len(raw), str(exc) or "protobuf decode error")


def deserialize_coordinator_message(raw: bytes) -> pb.CoordinatorMessage | RawChunk:
    """Parse a coordinator message; payload chunks take a zero-copy fast path."""
    chunk = decode_chunk_message(raw, CHUNK_FIELD_IN_COORDINATOR_MESSAGE)
    return chunk if chunk is not None else pb.CoordinatorMessage.FromString(raw)


def serialize_coordinator_message(message: pb.CoordinatorMessage | bytes) -> bytes:
    """Serialize a message, or pass through one that is already serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def serialize_worker_message(message: pb.WorkerMessage | bytes) -> bytes:
    """Serialize a message, or pass through one that is already serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()
