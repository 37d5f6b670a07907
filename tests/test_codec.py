"""The tensor codec: exact round trips, and every malformed payload refused before harm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.codec import (
    CHUNK_FIELD_IN_COORDINATOR_MESSAGE,
    CHUNK_FIELD_IN_WORKER_MESSAGE,
    PayloadAssembler,
    PayloadPieces,
    decode_chunk_message,
    encode_chunk_message,
    iter_chunks,
    make_header,
    num_chunks,
)
from fedcore.errors import ModelMismatchError, PayloadError
from fedcore.protocol import deserialize_worker_message
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of

DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _assemble(header: pb.PayloadHeader, chunks: list[bytes]) -> Weights:
    assembler = PayloadAssembler(header, max_bytes=1 << 30, max_chunk_bytes=header.chunk_bytes or 1)
    for i, data in enumerate(chunks):
        assembler.add(pb.PayloadChunk(index=i, data=data))
    return assembler.weights()


@st.composite
def weight_sets(draw: st.DrawFn) -> Weights:
    n = draw(st.integers(1, 5))
    out: Weights = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
        out[f"t{i}.w"] = (rng.standard_normal(shape) * 10).astype(dtype)
    return out


@settings(max_examples=150, deadline=None)
@given(weights=weight_sets(), chunk=st.integers(1, 300))
def test_round_trip_is_exact_for_any_chunk_size(weights: Weights, chunk: int) -> None:
    header = make_header(weights, chunk)
    chunks = list(iter_chunks(weights, chunk))
    assert len(chunks) == num_chunks(header.total_bytes, chunk)
    assert all(len(c) == chunk for c in chunks[:-1])
    out = _assemble(header, chunks)
    assert signature_of(out) == signature_of(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(out[name], array)


def test_big_endian_input_travels_little_endian() -> None:
    weights: Weights = {"w": np.arange(6, dtype=">f4").reshape(2, 3)}
    header = make_header(weights, 8)
    out = _assemble(header, list(iter_chunks(weights, 8)))
    np.testing.assert_array_equal(out["w"], np.arange(6, dtype="<f4").reshape(2, 3))


def _header(**fields: object) -> pb.PayloadHeader:
    tensors = fields.pop("tensors", [pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[4])])
    h = pb.PayloadHeader(tensors=tensors, total_bytes=16, chunk_bytes=8)  # type: ignore[arg-type]
    for k, v in fields.items():
        setattr(h, k, v)
    return h


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (_header(total_bytes=17), "declares 17 bytes but its tensors need 16"),
        (_header(total_bytes=1 << 40), "above the limit"),
        (_header(chunk_bytes=0), "chunks of 0 bytes"),
        (_header(chunk_bytes=1 << 30), "chunks of"),
        (
            _header(
                tensors=[
                    pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2]),
                    pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2]),
                ]
            ),
            "twice",
        ),
        (
            _header(tensors=[pb.TensorSpec(name="w", dtype=pb.DType.ValueType(99), shape=[4])]),
            "unsupported dtype",
        ),
        (_header(tensors=[pb.TensorSpec(name="", dtype=pb.DTYPE_FLOAT32, shape=[4])]), "empty"),
        (
            # A lying shape: 2^62 elements. Refused from arithmetic alone, nothing allocated.
            _header(
                tensors=[pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2**31, 2**31])]
            ),
            "larger than the limit",
        ),
    ],
)
def test_bad_headers_are_refused(header: pb.PayloadHeader, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        PayloadAssembler(header, max_bytes=1 << 20, max_chunk_bytes=1024)


def test_chunks_must_come_in_order_with_exact_sizes() -> None:
    def fresh() -> PayloadAssembler:
        return PayloadAssembler(_header(), max_bytes=1024, max_chunk_bytes=1024)

    with pytest.raises(PayloadError, match="expected chunk 0"):
        fresh().add(pb.PayloadChunk(index=1, data=b"\0" * 8))
    with pytest.raises(PayloadError, match="has 7 bytes, expected 8"):
        fresh().add(pb.PayloadChunk(index=0, data=b"\0" * 7))
    a = fresh()
    a.add(pb.PayloadChunk(index=0, data=b"\0" * 8))
    with pytest.raises(PayloadError, match="expected chunk 1"):
        a.add(pb.PayloadChunk(index=0, data=b"\0" * 8))  # duplicate
    with pytest.raises(PayloadError, match="incomplete"):
        a.weights()
    assert a.add(pb.PayloadChunk(index=1, data=b"\0" * 8))
    with pytest.raises(PayloadError, match="after the last one"):
        a.add(pb.PayloadChunk(index=2, data=b"\0" * 8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    weights: Weights = {"a": np.ones(3, np.float32), "b": np.array([1.0, bad], np.float64)}
    header = make_header(weights, 4)
    with pytest.raises(PayloadError, match="'b' contains NaN or Inf"):
        _assemble(header, list(iter_chunks(weights, 4)))


@settings(max_examples=200, deadline=None)
@given(
    weights=weight_sets(),
    chunk=st.integers(1, 64),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 2**16),
)
def test_a_non_finite_float_is_found_wherever_the_chunks_split_it(
    weights: Weights, chunk: int, bad: float, where: int
) -> None:
    # Floats are checked chunk by chunk as they arrive, an element split between two chunks
    # once both halves are in; the poisoned element may sit anywhere, after odd-sized tensors.
    floats = [name for name, a in weights.items() if a.dtype.kind == "f" and a.size]
    header = make_header(weights, chunk)
    # Positive control: the same payload, clean, is accepted whole.
    clean = _assemble(header, list(iter_chunks(weights, chunk)))
    assert all(np.array_equal(clean[n], a) for n, a in weights.items())
    if not floats:
        return
    name = floats[where % len(floats)]
    poisoned = {n: np.array(a, copy=True, ndmin=0) for n, a in weights.items()}
    flat = poisoned[name].reshape(-1)  # a view: every tensor here is a contiguous array
    flat[where % flat.size] = bad
    with pytest.raises(PayloadError, match=f"'{name}' contains NaN or Inf"):
        _assemble(header, list(iter_chunks(poisoned, chunk)))


@settings(max_examples=100, deadline=None)
@given(weights=weight_sets(), chunk=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_payload_pieces_in_any_order_are_the_sequential_chunks(
    weights: Weights, chunk: int, seed: int
) -> None:
    pieces = PayloadPieces(weights, chunk)
    expected = list(iter_chunks(weights, chunk))
    assert pieces.count == len(expected)
    order = np.random.default_rng(seed).permutation(pieces.count)
    assert all(bytes(pieces.piece(int(i))) == expected[i] for i in order)
    with pytest.raises(IndexError):
        pieces.piece(pieces.count)


def test_expected_signature_is_enforced() -> None:
    weights: Weights = {"w": np.zeros((2, 3), np.float32)}
    header = make_header(weights, 64)
    expected = signature_of({"w": np.zeros((3, 2), np.float32)})
    with pytest.raises(
        ModelMismatchError, match=r"'w' is float32\[2, 3\], expected float32\[3, 2\]"
    ):
        PayloadAssembler(header, max_bytes=1024, max_chunk_bytes=64, expected=expected)


def test_chunks_never_hold_more_than_chunk_bytes_for_large_tensors() -> None:
    weights: Weights = {"big": np.arange(100_000, dtype=np.float32)}
    sizes = [len(c) for c in iter_chunks(weights, 65_536)]
    assert max(sizes) == 65_536
    assert sum(sizes) == 400_000


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2**40), data=st.binary(max_size=300))
def test_hand_encoded_chunk_messages_equal_protobuf(index: int, data: bytes) -> None:
    coordinator = pb.CoordinatorMessage(chunk=pb.PayloadChunk(index=index, data=data))
    worker = pb.WorkerMessage(chunk=pb.PayloadChunk(index=index, data=data))
    assert encode_chunk_message(CHUNK_FIELD_IN_COORDINATOR_MESSAGE, index, memoryview(data)) == (
        coordinator.SerializeToString()
    )
    assert (
        encode_chunk_message(CHUNK_FIELD_IN_WORKER_MESSAGE, index, data)
        == worker.SerializeToString()
    )


def test_hand_encoded_large_chunk_parses_back() -> None:
    data = np.random.default_rng(0).bytes(3 << 20)
    raw = encode_chunk_message(CHUNK_FIELD_IN_WORKER_MESSAGE, 300, data)
    message = pb.WorkerMessage.FromString(raw)
    assert message.chunk.index == 300
    assert message.chunk.data == data


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2**40), data=st.binary(max_size=300))
def test_chunk_fast_path_decodes_what_protobuf_encodes(index: int, data: bytes) -> None:
    raw = pb.WorkerMessage(chunk=pb.PayloadChunk(index=index, data=data)).SerializeToString()
    chunk = decode_chunk_message(raw, CHUNK_FIELD_IN_WORKER_MESSAGE)
    assert chunk is not None
    assert chunk.index == index
    assert bytes(chunk.data) == data
    assert chunk.wire_size == len(raw)
    # The other envelope's field number never matches.
    assert decode_chunk_message(raw, CHUNK_FIELD_IN_COORDINATOR_MESSAGE) is None


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_chunk_fast_path_never_accepts_what_protobuf_would_not(raw: bytes) -> None:
    """Garbage either falls back to protobuf or decodes to the same chunk protobuf sees."""
    chunk = decode_chunk_message(raw, CHUNK_FIELD_IN_WORKER_MESSAGE)
    if chunk is None:
        return
    message = pb.WorkerMessage.FromString(raw)
    assert message.WhichOneof("body") == "chunk"
    assert (message.chunk.index, message.chunk.data) == (chunk.index, bytes(chunk.data))


def test_other_messages_take_the_protobuf_path() -> None:
    hello = pb.WorkerMessage(hello=pb.Hello(name="a")).SerializeToString()
    assert decode_chunk_message(hello, CHUNK_FIELD_IN_WORKER_MESSAGE) is None
    assert isinstance(deserialize_worker_message(hello), pb.WorkerMessage)
