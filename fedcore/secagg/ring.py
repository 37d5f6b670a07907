"""The coordinator's running ring sum of masked inputs, taken whole or chunk by chunk.

Masked inputs are vectors over the ring of integers mod ``2**bits`` (``bits`` of the
fixed point's unsigned dtype), and they only ever meet by addition: so an input can be added
piece by piece as its chunks arrive, and the coordinator holds one ring vector however many
inputs stream at once. An input cut off part-way is taken back out exactly by modular
subtraction: each stream journals the words it added (:mod:`fedcore.strategy.journal`, as the
plain fold does: the received chunks kept by reference, no copy, up to a memory budget the
round's streams share, then an unlinked temporary file) and subtracts them again on
:meth:`MaskedInputStream.abort`. Only a complete
input that the round still accepts joins U3 (:meth:`MaskedInputStream.commit`); phase 3
closing takes every input still under way back out first (:meth:`RingSum.close`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError
from fedcore.strategy.journal import DEFAULT_JOURNAL_MEMORY, Journal, JournalBudget

__all__ = ["MaskedInputStream", "RingSum"]

UIntArray = npt.NDArray[np.unsignedinteger]


class RingSum:
    """The sum of masked inputs of ``words`` ring elements of ``dtype`` (wrapping addition).

    Thread-safe: pieces of different inputs may be added from different threads.
    """

    def __init__(
        self,
        words: int,
        dtype: np.dtype[np.unsignedinteger],
        *,
        journal_dir: str | None = None,
        journal_memory: int = DEFAULT_JOURNAL_MEMORY,
    ) -> None:
        """``journal_memory``: bytes of received pieces the streams' journals may keep in
        memory, all together; beyond it they spill to ``journal_dir``."""
        self.words = words
        self.dtype = np.dtype(dtype)
        self.vector: UIntArray = np.zeros(words, dtype=self.dtype)
        self.lock = threading.Lock()
        self.journal = JournalBudget(journal_memory, directory=journal_dir)
        self._open: set[MaskedInputStream] = set()
        self.closed = False

    def add(self, vector: UIntArray) -> None:
        """Add a whole masked input."""
        with self.lock:
            if self.closed:
                raise ValueError("the ring sum no longer takes inputs")
            np.add(self.vector, vector, out=self.vector)

    def open(self, index: int, on_commit: Callable[[int], bool]) -> MaskedInputStream:
        """A stream for participant ``index``'s input; ``on_commit(index)`` (called under
        :attr:`lock` once the input is complete) says whether the round still takes it."""
        stream = MaskedInputStream(self, index, on_commit)
        with self.lock:
            if self.closed:
                raise ValueError("the ring sum no longer takes inputs")
            self._open.add(stream)
        return stream

    def close(self) -> None:
        """End the inputs: take every input still under way back out, refuse new pieces."""
        with self.lock:
            for stream in list(self._open):
                stream.take_back()
            self._open.clear()
            self.closed = True

    def abandon(self) -> None:
        """The round aborted: refuse new pieces and drop every stream's journal (the sum is
        never unmasked, so nothing needs taking back)."""
        with self.lock:
            self.closed = True
            for stream in list(self._open):
                stream.take_back()
            self._open.clear()

    def discard(self, stream: MaskedInputStream) -> None:
        """Forget a stream that committed or was taken back (hold :attr:`lock`)."""
        self._open.discard(stream)

    def fold(self, start: int, values: UIntArray, sign: int) -> None:
        """Add (``sign`` 1) or subtract (-1) ``values`` at ``start`` (hold :attr:`lock`)."""
        target = self.vector[start : start + values.size]
        if sign > 0:
            np.add(target, values, out=target)
        else:
            np.subtract(target, values, out=target)


class MaskedInputStream:
    """One masked input being added to a :class:`RingSum` piece by piece (a
    :class:`~fedcore.strategy.PieceSink`: its pieces come in order, from the first word)."""

    def __init__(self, ring: RingSum, index: int, on_commit: Callable[[int], bool]) -> None:
        self.index = index
        self._ring = ring
        self._on_commit = on_commit
        self._journal = Journal(ring.journal)
        self.received = 0
        self.state = "open"

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        """Add the words ``start..`` of the input; False when the stream or the round's
        inputs were closed meanwhile. Refuses (PayloadError) a piece out of place."""
        ring = self._ring
        if values.dtype != ring.dtype:
            raise PayloadError(f"a masked input holds {ring.dtype} words, not {values.dtype}")
        words: UIntArray = np.ascontiguousarray(values).reshape(-1)
        with ring.lock:
            if self.state != "open" or ring.closed:
                return False
            if start != self.received or start + words.size > ring.words:
                raise PayloadError(
                    f"a piece of {words.size} words at {start} does not follow the "
                    f"{self.received} received, or overruns the {ring.words} of a masked input"
                )
            try:
                self._journal.append("", start, words)
            except OSError as exc:
                raise PayloadError(f"the upload journal could not be written: {exc}") from exc
            ring.fold(start, words, +1)
            self.received += words.size
        return True

    def commit(self) -> bool:
        """Count the complete input (the round adds its sender to U3); False, and the input
        taken back out, when it is incomplete or the round no longer takes it."""
        ring = self._ring
        with ring.lock:
            if self.state != "open":
                return False
            if ring.closed or self.received != ring.words or not self._on_commit(self.index):
                self.take_back()
                return False
            self.state = "committed"
            ring.discard(self)
            self._journal.close()
        return True

    def abort(self) -> None:
        """Take back, exactly, every word added so far."""
        with self._ring.lock:
            self.take_back()

    def take_back(self) -> None:
        """:meth:`abort` with the ring's lock already held."""
        if self.state != "open":
            return
        if not self._ring.closed:
            for _, start, words in self._journal.replay():
                self._ring.fold(start, words.view(self._ring.dtype), -1)
        self.state = "aborted"
        self._ring.discard(self)
        self._journal.close()
