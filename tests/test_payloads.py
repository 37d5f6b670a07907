"""The global model's chunk messages: encoded once per round, shared by the streams."""

from __future__ import annotations

import numpy as np

from fedcore.codec import CHUNK_FIELD_IN_COORDINATOR_MESSAGE, encode_chunk_message, iter_chunks
from fedcore.heap import threshold_for
from fedcore.protocol import DEFAULT_CHUNK_BYTES, max_message_bytes
from fedcore.server.transport.payloads import WeightsPayload
from fedcore.weights import Weights

WEIGHTS: Weights = {
    "a": np.arange(1000, dtype=np.float32),
    "b": np.arange(333, dtype=np.int8),  # odd sized: later chunks span two tensors
    "c": np.linspace(0, 1, 2000).astype(np.float64),
}
CHUNK = 1024


def _expected() -> list[bytes]:
    return [
        encode_chunk_message(CHUNK_FIELD_IN_COORDINATOR_MESSAGE, i, data)
        for i, data in enumerate(iter_chunks(WEIGHTS, CHUNK))
    ]


def test_streams_in_step_share_one_encoding_of_each_chunk() -> None:
    payload = WeightsPayload(WEIGHTS, CHUNK, keep=2)
    streams = [payload.messages() for _ in range(8)]
    received: list[list[bytes]] = [[] for _ in streams]
    for _ in range(payload.chunks):  # the streams take turns, as the coordinator's writes do
        for stream, got in zip(streams, received, strict=True):
            got.append(next(stream))
    expected = _expected()
    assert all(got == expected for got in received)
    assert payload.encoded == payload.chunks == len(expected) > 2


def test_a_stream_far_behind_encodes_again_and_gets_the_same_bytes() -> None:
    payload = WeightsPayload(WEIGHTS, CHUNK, keep=2)
    ahead = list(payload.messages())
    assert payload.encoded == payload.chunks
    behind = list(payload.messages())  # the first chunks were dropped: encoded a second time
    assert ahead == behind == _expected()
    assert payload.encoded == 2 * payload.chunks


def test_the_heap_threshold_sits_just_above_one_chunk_message() -> None:
    message = max_message_bytes(DEFAULT_CHUNK_BYTES)  # 3 MiB
    assert message < threshold_for(message) == 4 * 1024 * 1024 <= 2 * message
    assert threshold_for(0) == 1024 * 1024  # never below glibc's usual 1 MiB
    assert threshold_for(10**9) == 32 * 1024 * 1024  # nor above its largest
