"""An update folded into its round's aggregate chunk by chunk, as the chunks arrive.

Each chunk is checked (its index and size; every element finite and in the exact sum's range,
:mod:`fedcore.strategy.fixed_point`) and its elements are folded at once into the strategy's
:class:`~fedcore.strategy.UpdateStream`: the upload is never staged whole. A chunk may cut an
element in two; its first bytes wait (at most 7 of them) for the next chunk. A delta update
(``UPDATE_KIND_DELTA``) gets the global weights added per piece, in the tensor's dtype, exactly
as a whole update does, so a streamed update folds the same integers as a staged one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedcore.codec import ChunkLike
from fedcore.errors import PayloadError
from fedcore.strategy import PieceSink
from fedcore.weights import ModelSignature, Weights

__all__ = ["StreamedUpload", "layout_of"]

Layout = dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]]


def layout_of(signature: ModelSignature) -> Layout:
    """name -> (shape, little-endian dtype) of a payload's tensors, in payload order."""
    return {s.name: (tuple(s.shape), np.dtype(s.dtype).newbyteorder("<")) for s in signature}


class StreamedUpload:
    """Folds one upload's chunks into ``stream`` (call :meth:`add` in a worker thread)."""

    def __init__(
        self,
        signature: ModelSignature,
        *,
        total_bytes: int,
        chunk_bytes: int,
        stream: PieceSink,
        base: Weights | None,
        what: str,
    ) -> None:
        self.stream = stream
        self._what = what
        self._base = base
        self._total = total_bytes
        self._chunk_bytes = chunk_bytes
        self.expected_chunks = -(-total_bytes // chunk_bytes) if total_bytes else 0
        self.received_chunks = 0
        # (name, dtype, first byte, end byte) of every non-empty tensor, in payload order.
        self._tensors: list[tuple[str, np.dtype[np.generic], int, int]] = []
        offset = 0
        for name, (shape, dtype) in layout_of(signature).items():
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size:
                self._tensors.append((name, dtype, offset, offset + size))
            offset += size
        self._next = 0  # the tensor holding byte ``self._pos``
        self._pos = 0  # every byte before it was folded
        self._carry = b""  # the first bytes of the element at ``self._pos``

    @property
    def complete(self) -> bool:
        return self.received_chunks == self.expected_chunks

    def abort(self) -> None:
        """Take back, exactly, every element folded so far."""
        self.stream.abort()

    def add(self, chunk: ChunkLike) -> None:
        """Check and fold the next chunk. Raises PayloadError on a bad one (the caller then
        aborts the stream, taking back what was folded)."""
        if chunk.index != self.received_chunks:
            raise PayloadError(
                f"{self._what}: chunk {chunk.index} arrived, expected chunk {self.received_chunks}"
            )
        size = min(self._chunk_bytes, self._total - chunk.index * self._chunk_bytes)
        if len(chunk.data) != size:
            raise PayloadError(
                f"{self._what}: chunk {chunk.index} has {len(chunk.data)} bytes, expected {size}"
            )
        data = memoryview(chunk.data).cast("B")
        offset = 0
        while offset < len(data):
            name, dtype, first, end = self._tensors[self._next]
            if self._carry:  # complete the element cut by the previous chunk
                take = min(dtype.itemsize - len(self._carry), len(data) - offset)
                self._carry += bytes(data[offset : offset + take])
                offset += take
                if len(self._carry) < dtype.itemsize:
                    break
                element = np.frombuffer(self._carry, dtype=dtype)
                self._carry = b""
                self._fold(name, dtype, first, element)
                continue
            whole = min(end - self._pos, len(data) - offset) // dtype.itemsize
            if whole:
                values = np.frombuffer(data, dtype=dtype, count=whole, offset=offset)
                offset += whole * dtype.itemsize
                self._fold(name, dtype, first, values)
            elif offset < len(data):  # the chunk ends inside an element
                self._carry = bytes(data[offset:])
                offset = len(data)
        self.received_chunks += 1

    def _fold(
        self, name: str, dtype: np.dtype[np.generic], first: int, values: npt.NDArray[np.generic]
    ) -> None:
        start = (self._pos - first) // dtype.itemsize
        if self._base is not None:
            base = self._base[name].reshape(-1)[start : start + values.size]
            # The whole-update path adds in place into the delta's dtype: the same rounding.
            values = np.add(values, base, dtype=dtype, casting="unsafe")
        # False: the round closed meanwhile and took the stream back; the rest goes nowhere.
        try:
            self.stream.fold(name, start, values)
        except PayloadError as exc:
            raise PayloadError(f"{self._what}: {exc}") from None
        self._pos += values.size * dtype.itemsize
        if self._pos == self._tensors[self._next][3] and self._next + 1 < len(self._tensors):
            self._next += 1
