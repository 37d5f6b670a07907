"""Tensor payloads on the wire: typed raw little-endian bytes, cut into chunks.

Sending: :func:`make_header` describes the weights, :func:`iter_chunks` yields their bytes in
``chunk_bytes`` pieces without ever concatenating the whole model.

Receiving: :class:`PayloadAssembler` checks a header *before* allocating anything (names,
dtypes, shapes, declared sizes against the limit and, when known, against the expected model
signature), then accepts chunks strictly in order and with exact sizes, and finally hands out
zero-copy array views after checking that every float is finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import (
    ModelSignature,
    TensorSignature,
    Weights,
    check_signature,
    signature_of,
)

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_TENSORS",
    "ChunkLike",
    "PayloadAssembler",
    "RawChunk",
    "decode_chunk_message",
    "encode_chunk_message",
    "header_signature",
    "iter_chunk_views",
    "iter_chunks",
    "make_header",
    "num_chunks",
    "signature_specs",
]

MAX_TENSORS = 100_000
MAX_NAME_LENGTH = 512
MAX_DIMS = 16

# Little-endian numpy dtypes by wire code. bfloat16 has a wire code for forward compatibility
# but no numpy type; it is refused with a clear message.
_WIRE_TO_DTYPE: dict[pb.DType.ValueType, np.dtype[np.generic]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
    pb.DTYPE_UINT32: np.dtype("<u4"),
    pb.DTYPE_UINT64: np.dtype("<u8"),
}
_NAME_TO_WIRE: dict[str, pb.DType.ValueType] = {
    dt.name: code for code, dt in _WIRE_TO_DTYPE.items()
}


def _wire_dtype(dtype: np.dtype[np.generic], name: str) -> pb.DType.ValueType:
    try:
        return _NAME_TO_WIRE[dtype.name]
    except KeyError:
        raise PayloadError(
            f"tensor {name!r} has dtype {dtype.name}, which fedcore cannot send; "
            f"cast it to one of {sorted(_NAME_TO_WIRE)}"
        ) from None


def num_chunks(total: int, chunk_bytes: int) -> int:
    """How many chunks a payload of ``total`` bytes is cut into."""
    return math.ceil(total / chunk_bytes) if total else 0


def signature_specs(signature: ModelSignature) -> list[pb.TensorSpec]:
    """A model signature as wire TensorSpecs."""
    return [
        pb.TensorSpec(name=t.name, dtype=_wire_dtype(np.dtype(t.dtype), t.name), shape=t.shape)
        for t in signature
    ]


def make_header(
    weights: Mapping[str, npt.NDArray[np.generic]], chunk_bytes: int
) -> pb.PayloadHeader:
    """Describe ``weights`` for the wire."""
    if chunk_bytes <= 0:
        raise PayloadError(f"chunk size must be positive, got {chunk_bytes}")
    signature = signature_of(weights)
    return pb.PayloadHeader(
        tensors=signature_specs(signature),
        total_bytes=sum(a.nbytes for a in weights.values()),
        chunk_bytes=chunk_bytes,
    )


def header_signature(header: pb.PayloadHeader) -> ModelSignature:
    """The model signature a header declares (no validation; see PayloadAssembler)."""
    return tuple(
        TensorSignature(t.name, _WIRE_TO_DTYPE[t.dtype].name, tuple(t.shape))
        for t in header.tensors
    )


def _le_bytes(array: npt.NDArray[np.generic]) -> memoryview:
    """A flat byte view of ``array`` in little-endian order (copies only if it must)."""
    le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return le.reshape(-1).view(np.uint8).data


def iter_chunk_views(
    weights: Mapping[str, npt.NDArray[np.generic]], chunk_bytes: int
) -> Iterator[memoryview | bytes]:
    """Yield the payload of ``weights`` in pieces of exactly ``chunk_bytes`` (last shorter).

    A piece inside one tensor is a zero-copy view (valid while the weights are unchanged); a
    piece spanning tensors is joined into bytes.
    """
    pending: list[memoryview] = []
    pending_len = 0
    for array in weights.values():
        view = _le_bytes(array)
        offset = 0
        while offset < len(view):
            take = min(chunk_bytes - pending_len, len(view) - offset)
            piece = view[offset : offset + take]
            offset += take
            if pending_len == 0 and take == chunk_bytes:
                yield piece
                continue
            pending.append(piece)
            pending_len += take
            if pending_len == chunk_bytes:
                yield b"".join(pending)
                pending, pending_len = [], 0
    if pending_len:
        yield b"".join(pending)


def iter_chunks(
    weights: Mapping[str, npt.NDArray[np.generic]], chunk_bytes: int
) -> Iterator[bytes]:
    """Like :func:`iter_chunk_views`, as bytes."""
    for piece in iter_chunk_views(weights, chunk_bytes):
        yield piece if isinstance(piece, bytes) else bytes(piece)


# Field numbers of PayloadChunk inside the two stream envelopes (see the .proto).
CHUNK_FIELD_IN_COORDINATOR_MESSAGE = 3
CHUNK_FIELD_IN_WORKER_MESSAGE = 4


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True, slots=True)
class RawChunk:
    """A PayloadChunk read straight off the wire: ``data`` is a view into the received bytes."""

    index: int
    data: memoryview
    wire_size: int


class ChunkLike(Protocol):
    """Anything with a chunk's index and data (a ``pb.PayloadChunk`` or a :class:`RawChunk`)."""

    @property
    def index(self) -> int: ...

    @property
    def data(self) -> bytes | memoryview: ...


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def decode_chunk_message(raw: bytes, envelope_field: int) -> RawChunk | None:
    """The chunk in ``raw`` if it is exactly ``Envelope(chunk=PayloadChunk(...))`` in canonical
    encoding, without copying its data; None for anything else (parse that with protobuf)."""
    if len(raw) < 2 or raw[0] != (envelope_field << 3 | 2):
        return None
    length, pos = _read_varint(raw, 1)
    if pos + length != len(raw):
        return None
    index = 0
    if pos < len(raw) and raw[pos] == 0x08:
        index, pos = _read_varint(raw, pos + 1)
        if index < 0:
            return None
    if pos == len(raw):
        return RawChunk(index, memoryview(b""), len(raw))
    if raw[pos] != 0x12:
        return None
    size, pos = _read_varint(raw, pos + 1)
    if size < 0 or pos + size != len(raw):
        return None
    return RawChunk(index, memoryview(raw)[pos:], len(raw))


def encode_chunk_message(envelope_field: int, index: int, data: memoryview | bytes) -> bytes:
    """Serialize ``Envelope(chunk=PayloadChunk(index=index, data=data))`` in one copy.

    This is the payload hot path: building the protobuf message and serializing it would copy
    every chunk twice more. The bytes are exactly what protobuf produces for that message (a
    test checks it against ``SerializeToString``): field ``envelope_field`` as a length-delimited
    submessage holding field 1 (varint index) and field 2 (bytes), each omitted when empty as
    proto3 does.
    """
    size = len(data)
    inner_head = (b"\x08" + _varint(index) if index else b"") + (
        b"\x12" + _varint(size) if size else b""
    )
    outer_head = _varint(envelope_field << 3 | 2) + _varint(len(inner_head) + size)
    return b"".join((outer_head, inner_head, data))


class PayloadAssembler:
    """Rebuilds a chunked payload, validating everything it is given.

    Args:
        header: the header announcing the payload.
        max_bytes: the largest payload accepted; checked before any allocation.
        max_chunk_bytes: the largest chunk accepted (the gRPC message limit bounds it too).
        expected: when given, the payload must have exactly this signature.
        what: words naming the payload in error messages ("update from worker 'a'").
    """

    def __init__(
        self,
        header: pb.PayloadHeader,
        *,
        max_bytes: int,
        max_chunk_bytes: int,
        expected: ModelSignature | None = None,
        what: str = "payload",
    ) -> None:
        self._what = what
        self.signature = self._validate_header(header, max_bytes, max_chunk_bytes)
        if expected is not None:
            check_signature(expected, self.signature, context=f"{what} does not fit the model")
        self.total_bytes = header.total_bytes
        self.chunk_bytes = header.chunk_bytes
        self.expected_chunks = num_chunks(self.total_bytes, self.chunk_bytes)
        self.received_chunks = 0
        # Allocated at the first chunk, once the size is known to be honest and in the limit.
        self._buffer: npt.NDArray[np.uint8] | None = None

    def _storage(self) -> npt.NDArray[np.uint8]:
        if self._buffer is None:
            self._buffer = np.empty(self.total_bytes, dtype=np.uint8)
        return self._buffer

    @property
    def complete(self) -> bool:
        return self.received_chunks == self.expected_chunks

    def _validate_header(
        self, header: pb.PayloadHeader, max_bytes: int, max_chunk_bytes: int
    ) -> ModelSignature:
        what = self._what
        if len(header.tensors) > MAX_TENSORS:
            raise PayloadError(
                f"{what} declares {len(header.tensors)} tensors (limit {MAX_TENSORS})"
            )
        if header.total_bytes > max_bytes:
            raise PayloadError(
                f"{what} declares {header.total_bytes} bytes, above the limit of {max_bytes}; "
                "raise --max-model-bytes if this model is meant to be this large"
            )
        if not 0 < header.chunk_bytes <= max_chunk_bytes:
            raise PayloadError(
                f"{what} declares chunks of {header.chunk_bytes} bytes; "
                f"accepted: 1..{max_chunk_bytes}"
            )
        seen: set[str] = set()
        specs: list[TensorSignature] = []
        computed = 0
        for t in header.tensors:
            if not t.name or len(t.name) > MAX_NAME_LENGTH:
                raise PayloadError(f"{what} has a tensor name that is empty or too long")
            if t.name in seen:
                raise PayloadError(f"{what} names tensor {t.name!r} twice")
            seen.add(t.name)
            dtype = _WIRE_TO_DTYPE.get(t.dtype)
            if dtype is None:
                raise PayloadError(
                    f"{what}: tensor {t.name!r} has unsupported dtype code {t.dtype}"
                )
            if len(t.shape) > MAX_DIMS:
                raise PayloadError(f"{what}: tensor {t.name!r} has {len(t.shape)} dimensions")
            elements = 1
            for d in t.shape:
                elements *= d
                # Python ints do not overflow; stop early so a lying shape costs nothing.
                if elements * dtype.itemsize > max_bytes:
                    raise PayloadError(f"{what}: tensor {t.name!r} is larger than the limit")
            computed += elements * dtype.itemsize
            specs.append(TensorSignature(t.name, dtype.name, tuple(int(d) for d in t.shape)))
        if computed != header.total_bytes:
            raise PayloadError(
                f"{what} declares {header.total_bytes} bytes but its tensors need {computed}"
            )
        return tuple(specs)

    def add(self, chunk: ChunkLike) -> bool:
        """Accept the next chunk; return True once the payload is complete."""
        if self.complete:
            raise PayloadError(f"{self._what}: chunk {chunk.index} arrived after the last one")
        if chunk.index != self.received_chunks:
            raise PayloadError(
                f"{self._what}: chunk {chunk.index} arrived, expected chunk {self.received_chunks}"
            )
        start = chunk.index * self.chunk_bytes
        size = min(self.chunk_bytes, self.total_bytes - start)
        if len(chunk.data) != size:
            raise PayloadError(
                f"{self._what}: chunk {chunk.index} has {len(chunk.data)} bytes, expected {size}"
            )
        self._storage()[start : start + size] = np.frombuffer(chunk.data, dtype=np.uint8)
        self.received_chunks += 1
        return self.complete

    def weights(self, *, require_finite: bool = True) -> Weights:
        """The received tensors (views of one buffer); checks finiteness of floats."""
        if not self.complete:
            raise PayloadError(
                f"{self._what} is incomplete: {self.received_chunks} of "
                f"{self.expected_chunks} chunks arrived"
            )
        out: Weights = {}
        offset = 0
        buffer = self._storage()
        for spec in self.signature:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            count = spec.num_elements
            array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            offset += count * dtype.itemsize
            if require_finite and dtype.kind == "f" and not _all_finite(array):
                raise PayloadError(f"{self._what}: tensor {spec.name!r} contains NaN or Inf")
            out[spec.name] = array.reshape(spec.shape)
        return out


def _all_finite(array: npt.NDArray[np.generic], block: int = 1 << 20) -> bool:
    # Blockwise so the temporary boolean mask stays small for huge tensors.
    flat = array.reshape(-1)
    return all(
        np.isfinite(flat[start : start + block]).all() for start in range(0, flat.size, block)
    )


def weights_from_header_and_chunks(
    header: pb.PayloadHeader, chunks: list[bytes], *, max_bytes: int
) -> Weights:
    """Decode a payload already held in memory (tests and in-process tools)."""
    assembler = PayloadAssembler(
        header, max_bytes=max_bytes, max_chunk_bytes=max(header.chunk_bytes, 1)
    )
    for i, data in enumerate(chunks):
        assembler.add(pb.PayloadChunk(index=i, data=data))
    return assembler.weights()


def writable_copy(weights: Weights) -> Weights:
    """Own, writable copies of possibly read-only views."""
    return {name: np.array(a, copy=True) for name, a in weights.items()}
