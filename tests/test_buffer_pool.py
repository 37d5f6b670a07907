"""A receive buffer is reused only once nothing can reach its bytes (fedcore.buffer_pool)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedcore.buffer_pool import BufferPool
from fedcore.codec import PayloadAssembler, iter_chunks, make_header
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

SIZE = 1 << 20

# What a user of the buffer may keep after the array handed out is gone.
Keep = Callable[[npt.NDArray[np.uint8]], object]
KEEPERS: dict[str, Keep] = {
    "a slice": lambda a: a[8:],
    "a reinterpreting view": lambda a: a[8:].view(np.float32).reshape(-1, 2),
    "a torch tensor": lambda a: torch.from_numpy(a[:64]),
    # ndarray.data is memoryview(a); numpy's stubs declare the buffer protocol for Python 3.12+
    # only, so memoryview(a) does not type-check on 3.11.
    "a memoryview": lambda a: a.data[16:],
    "an array over its memoryview": lambda a: np.frombuffer(a.data, dtype=np.int32),
}


def test_a_dropped_buffer_is_handed_out_again() -> None:
    pool = BufferPool()
    first = pool.take(SIZE)
    address = first.ctypes.data
    del first
    gc.collect()
    again = pool.take(SIZE)
    assert again.ctypes.data == address
    assert pool.reused == 1
    assert pool.take(SIZE).ctypes.data != address  # in use: a new one


@pytest.mark.parametrize("keeper", sorted(KEEPERS))
def test_a_buffer_still_reachable_is_never_handed_out(keeper: str) -> None:
    pool = BufferPool()
    first = pool.take(SIZE)
    first[:] = 7
    address = first.ctypes.data
    kept = KEEPERS[keeper](first)
    del first
    gc.collect()
    other = pool.take(SIZE)
    assert other.ctypes.data != address
    assert pool.reused == 0
    other[:] = 0  # writing the new buffer leaves what is kept as it was
    assert bytes(np.asarray(kept).data.cast("B")[:4]) == b"\x07" * 4
    # Positive control: once the last reference goes, the same buffer comes back.
    del kept
    gc.collect()
    assert pool.take(SIZE).ctypes.data == address
    assert pool.reused == 1


def test_only_keep_free_buffers_are_held_and_sizes_must_match() -> None:
    pool = BufferPool(keep=1)
    a, b = pool.take(SIZE), pool.take(SIZE)
    del a, b
    gc.collect()
    assert pool.free == 1
    pool.take(SIZE // 2)  # another size: mapped anew
    assert pool.reused == 0
    assert pool.free == 1


def _payload(value: float) -> tuple[pb.PayloadHeader, list[bytes]]:
    weights: Weights = {"w": np.full(50_000, value, np.float32), "b": np.arange(10, dtype=np.int64)}
    return make_header(weights, 4096), list(iter_chunks(weights, 4096))


def _receive(pool: BufferPool, value: float) -> Weights:
    header, chunks = _payload(value)
    assembler = PayloadAssembler(
        header, max_bytes=1 << 30, max_chunk_bytes=4096, buffers=pool, what="weights"
    )
    for index, data in enumerate(chunks):
        assembler.add(pb.PayloadChunk(index=index, data=data))
    return assembler.weights()


def test_a_receiver_reuses_last_rounds_buffer_only_when_its_weights_are_gone() -> None:
    pool = BufferPool()
    held = _receive(pool, 1.0)
    second = _receive(pool, 2.0)  # the first round's weights are still held
    assert pool.reused == 0
    assert (held["w"] == 1.0).all()
    assert (second["w"] == 2.0).all()
    assert held["b"].tolist() == list(range(10))
    del held
    gc.collect()
    third = _receive(pool, 3.0)
    assert pool.reused == 1  # the first round's buffer, free again
    assert (third["w"] == 3.0).all()
    assert (second["w"] == 2.0).all()
