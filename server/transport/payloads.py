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
        for index, data in enumerate(iter_chunk_views(self._weights, self._chunk_bytes)):
            yield encode_chunk_message(CHUNK_FIELD_IN_COORDINATOR_MESSAGE, index, data)
