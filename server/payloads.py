"""The global weights as a stream of chunk messages, serialized as each stream sends them.

Serializing on demand keeps the coordinator's memory at the model plus one chunk per stream in
flight, instead of a serialized copy of the whole model per round.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedcore.codec import iter_chunks, make_header
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

__all__ = ["WeightsPayload"]


class WeightsPayload:
    """Weights to send after a Task: its header, and the chunk messages on demand."""

    def __init__(self, weights: Weights, chunk_bytes: int) -> None:
        self.header = make_header(weights, chunk_bytes)
        self._weights = weights
        self._chunk_bytes = chunk_bytes

    def messages(self) -> Iterator[bytes]:
        """Serialized ``CoordinatorMessage(chunk=...)`` messages, in order."""
        for index, data in enumerate(iter_chunks(self._weights, self._chunk_bytes)):
            yield pb.CoordinatorMessage(
                chunk=pb.PayloadChunk(index=index, data=data)
            ).SerializeToString()
