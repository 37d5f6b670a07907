"""The global weights as a stream of chunk messages, serialized as each stream sends them.

Serializing on demand keeps the coordinator's memory at the model plus one chunk per stream in
flight, instead of a serialized copy of the whole model per round.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedcore.codec import (
    CHUNK_FIELD_IN_COORDINATOR_MESSAGE,
    encode_chunk_message,
    iter_chunk_views,
    make_header,
)
from fedcore.frozen import frozen_digest
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

__all__ = ["FrozenPayload", "WeightsPayload"]


class WeightsPayload:
    """Weights to send after a Task: its header, and the chunk messages on demand."""

    def __init__(self, weights: Weights, chunk_bytes: int) -> None:
        self.header = make_header(weights, chunk_bytes)
        self._weights = weights
        self._chunk_bytes = chunk_bytes

    def messages(self) -> Iterator[bytes]:
        """Serialized ``CoordinatorMessage(chunk=...)`` messages, in order."""
        for index, data in enumerate(iter_chunk_views(self._weights, self._chunk_bytes)):
            yield encode_chunk_message(CHUNK_FIELD_IN_COORDINATOR_MESSAGE, index, data)


class FrozenPayload:
    """A model's frozen parameters: their digest, and their chunks for a worker without them."""

    def __init__(self, weights: Weights, chunk_bytes: int) -> None:
        self.weights = weights
        self.digest = frozen_digest(weights)
        self.payload = WeightsPayload(weights, chunk_bytes)

    def plan(self, *, attached: bool) -> pb.FrozenWeights:
        """What a Task says about them."""
        if not attached:  # the worker knows their layout: the digest covers it
            return pb.FrozenWeights(sha256=self.digest)
        return pb.FrozenWeights(sha256=self.digest, header=self.payload.header, attached=True)
