"""Tensor payloads on the wire: typed raw little-endian bytes, cut into chunks.

Sending: :func:`make_header` describes the weights, :func:`iter_chunks` yields their bytes in
``chunk_bytes`` pieces without ever concatenating the whole model.

Receiving: :class:`PayloadAssembler` checks a header *before* allocating anything (names,
dtypes, shapes, declared sizes against the limit and, when known, against the expected model
signature), then accepts chunks strictly in order and with exact sizes, and finally hands out
zero-copy array views after checking that every float is finite.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedcore.buffer_pool import BufferPool
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
    "PayloadPieces",
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


class PayloadPieces:
    """Random access to the ``chunk_bytes`` pieces of ``weights``' payload (the last shorter).

    A piece inside one tensor is a zero-copy view (valid while the weights are unchanged); a
    piece spanning tensors is joined into bytes. Random access lets many streams share pieces
    (the coordinator encodes each chunk message once per round, not once per stream).
    """

    def __init__(self, weights: Mapping[str, npt.NDArray[np.generic]], chunk_bytes: int) -> None:
        if chunk_bytes <= 0:
            raise PayloadError(f"chunk size must be positive, got {chunk_bytes}")
        self._arrays = list(weights.values())
        self._starts = list(itertools.accumulate((a.nbytes for a in self._arrays), initial=0))
        self.total_bytes = self._starts[-1]
        self.chunk_bytes = chunk_bytes
        self.count = num_chunks(self.total_bytes, chunk_bytes)
        # The last tensor's little-endian bytes: a big-endian or strided tensor is copied once
        # for all its pieces, not once per piece, and at most one such copy is held.
        self._view: tuple[int, memoryview] | None = None

    def _bytes_of(self, tensor: int) -> memoryview:
        if self._view is None or self._view[0] != tensor:
            self._view = (tensor, _le_bytes(self._arrays[tensor]))
        return self._view[1]

    def piece(self, index: int) -> memoryview | bytes:
        """The bytes of chunk ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} of a {self.count}-chunk payload")
        start = index * self.chunk_bytes
        stop = min(start + self.chunk_bytes, self.total_bytes)
        # The last tensor starting at or before ``start`` (empty tensors share its start).
        tensor = bisect.bisect_right(self._starts, start) - 1
        parts: list[memoryview] = []
        while start < stop:
            begin, end = self._starts[tensor], self._starts[tensor + 1]
            if end > start:
                view = self._bytes_of(tensor)
                parts.append(view[start - begin : min(stop, end) - begin])
                start = min(stop, end)
            tensor += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_chunk_views(
    weights: Mapping[str, npt.NDArray[np.generic]], chunk_bytes: int
) -> Iterator[memoryview | bytes]:
    """Yield the payload of ``weights`` in pieces of exactly ``chunk_bytes`` (last shorter),
    as :class:`PayloadPieces` cuts it."""
    pieces = PayloadPieces(weights, chunk_bytes)
    for index in range(pieces.count):
        yield pieces.piece(index)


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
        buffers: where the payload's buffer comes from (a receiver of one model a round
            reuses the last round's, :mod:`fedcore.buffer_pool`); by default a fresh one.
    """

    def __init__(
        self,
        header: pb.PayloadHeader,
        *,
        max_bytes: int,
        max_chunk_bytes: int,
        expected: ModelSignature | None = None,
        what: str = "payload",
        buffers: BufferPool | None = None,
    ) -> None:
        self._what = what
        self._buffers = buffers
        self.signature = self._validate_header(header, max_bytes, max_chunk_bytes)
        if expected is not None:
            check_signature(expected, self.signature, context=f"{what} does not fit the model")
        self.total_bytes = header.total_bytes
        self.chunk_bytes = header.chunk_bytes
        self.expected_chunks = num_chunks(self.total_bytes, self.chunk_bytes)
        self.received_chunks = 0
        # Allocated at the first chunk, once the size is known to be honest and in the limit.
        self._buffer: npt.NDArray[np.uint8] | None = None
        self._finite = _FiniteScan(self.signature, self.chunk_bytes)

    def _storage(self) -> npt.NDArray[np.uint8]:
        if self._buffer is None:
            self._buffer = (
                np.empty(self.total_bytes, dtype=np.uint8)
                if self._buffers is None
                else self._buffers.take(self.total_bytes)
            )
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
        storage = self._storage()
        storage[start : start + size] = np.frombuffer(chunk.data, dtype=np.uint8)
        # Checked now, while the chunk is in the CPU cache: a second pass over the whole
        # payload would read it from memory again.
        self._finite.advance(storage, start + size)
        self.received_chunks += 1
        return self.complete

    def weights(self) -> Weights:
        """The received tensors (views of one buffer), once every float was found finite."""
        if not self.complete:
            raise PayloadError(
                f"{self._what} is incomplete: {self.received_chunks} of "
                f"{self.expected_chunks} chunks arrived"
            )
        if self._finite.bad is not None:
            raise PayloadError(f"{self._what}: tensor {self._finite.bad!r} contains NaN or Inf")
        out: Weights = {}
        offset = 0
        buffer = self._storage()
        for spec in self.signature:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            count = spec.num_elements
            array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            offset += count * dtype.itemsize
            out[spec.name] = array.reshape(spec.shape)
        return out


class _FiniteScan:
    """Finds NaN and Inf in a payload's float tensors as their bytes arrive, in order.

    float32 and float64 go through BLAS: ``dot(x, 0)`` is 0 when every ``x`` is finite and NaN
    otherwise (``inf * 0`` is NaN), without the temporary mask of ``isfinite(x).all()``. Other
    float types use ``isfinite``.
    """

    _BLAS = (np.dtype("<f4"), np.dtype("<f8"))

    def __init__(self, signature: ModelSignature, chunk_bytes: int) -> None:
        # (name, dtype, first byte, end byte) of every float tensor, in payload order.
        self._ranges: list[tuple[str, np.dtype[np.generic], int, int]] = []
        offset = 0
        for spec in signature:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            size = spec.num_elements * dtype.itemsize
            if dtype.kind == "f" and size:
                self._ranges.append((spec.name, dtype, offset, offset + size))
            offset += size
        self._next = 0
        self._checked = 0  # every float byte before this one was checked
        self._chunk_bytes = chunk_bytes
        self._zeros: dict[np.dtype[np.generic], npt.NDArray[np.generic]] = {}
        self.bad: str | None = None  # the first tensor found with NaN or Inf

    def advance(self, buffer: npt.NDArray[np.uint8], received: int) -> None:
        """Check the float elements wholly inside ``buffer[:received]`` not checked yet."""
        while self._next < len(self._ranges) and self.bad is None:
            name, dtype, first, end = self._ranges[self._next]
            begin = max(first, self._checked)
            # Whole elements only: one split between two chunks waits for the second.
            stop = first + (min(end, received) - first) // dtype.itemsize * dtype.itemsize
            if stop > begin:
                if not self._finite(buffer[begin:stop].view(dtype)):
                    self.bad = name
                self._checked = stop
            if stop < end:
                return
            self._next += 1

    def _finite(self, values: npt.NDArray[np.generic]) -> bool:
        if values.dtype not in self._BLAS:
            return bool(np.isfinite(values).all())
        zeros = self._zeros.get(values.dtype)
        if zeros is None or zeros.size < values.size:
            # A segment is at most one chunk plus the element split before it.
            size = max(values.size, self._chunk_bytes // values.dtype.itemsize + 1)
            zeros = self._zeros[values.dtype] = np.zeros(size, dtype=values.dtype)
        with np.errstate(invalid="ignore"):  # inf * 0: the NaN is the answer, not an error
            return not math.isnan(float(np.dot(values, zeros[: values.size])))


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
