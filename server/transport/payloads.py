"""The global weights as a stream of chunk messages, encoded as the streams send them.

A round's streams send the same messages at about the same pace, so each message is encoded
once and shared: the coordinator copies the model once per round instead of once per worker,
and holds at most a few chunks besides the model whatever the number of workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from fedcore.codec import (
    CHUNK_FIELD_IN_COORDINATOR_MESSAGE,
    PayloadPieces,
    encode_chunk_message,
    make_header,
)
from fedcore.frozen import frozen_digest
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

__all__ = ["FrozenPayload", "WeightsPayload"]

#: Encoded chunk messages a payload keeps for the streams behind the one that encoded them.
SHARED_CHUNKS = 4


class WeightsPayload:
    """Weights to send after a Task: its header, and the chunk messages on demand.

    Each message is encoded by the first stream that needs it and kept until ``keep`` newer
    ones were encoded; a stream further behind than that encodes it again (same bytes).
    """

    def __init__(self, weights: Weights, chunk_bytes: int, *, keep: int = SHARED_CHUNKS) -> None:
        self.header = make_header(weights, chunk_bytes)
        self._pieces = PayloadPieces(weights, chunk_bytes)
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._keep = keep
        #: Chunk messages encoded so far (a round of N streams needs about ``chunks``, not N x).
        self.encoded = 0

    @property
    def chunks(self) -> int:
        """How many chunk messages the payload is cut into."""
        return self._pieces.count

    def message(self, index: int) -> bytes:
        """The serialized ``CoordinatorMessage(chunk=...)`` of chunk ``index``."""
        message = self._recent.get(index)
        if message is None:
            piece = self._pieces.piece(index)
            message = encode_chunk_message(CHUNK_FIELD_IN_COORDINATOR_MESSAGE, index, piece)
            self.encoded += 1
            self._recent[index] = message
            if len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return message

    def messages(self) -> Iterator[bytes]:
        """The chunk messages, in order."""
        for index in range(self._pieces.count):
            yield self.message(index)


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
