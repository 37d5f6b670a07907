"""What a stream folded into the exact sum, kept so that a cut can take it back out exactly.

Almost every upload completes, and then its journal is thrown away unread; writing it costs
the coordinator a copy per byte (measured: a page-cache write costs more than the fold
itself, ``scripts/bench_fold.py``). So a journal keeps its pieces *by reference* (the
received chunk's read-only buffer, no copy) while the round's :class:`JournalBudget` allows,
and only past that budget appends them to an unlinked temporary file, one unbuffered write
per piece. The coordinator's memory stays O(model): the sum, plus at most the budget of
journalled pieces for the whole round, however many uploads are in flight.

A piece kept by reference must not change while its stream is open: read-only arrays over
``bytes`` (``np.frombuffer`` of a received chunk, as the upload path makes) are kept as they
are, and charged the whole buffer they keep alive; any other array is copied first, since its
owner may reuse it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_JOURNAL_MEMORY", "Journal", "JournalBudget"]

#: Bytes of journalled pieces one round may keep in memory (all its uploads together). Small:
#: a large round spills almost all of it anyway (8 uploads of 40 MB against 16 MiB: 95%), and
#: every byte kept is a byte of the coordinator's peak (4 MiB: a model of 1M float32 whole).
DEFAULT_JOURNAL_MEMORY = 4 * 1024 * 1024

Piece = tuple[str, int, npt.NDArray[np.generic]]


class JournalBudget:
    """Memory shared by the journals of one sum's streams, and where their spills go."""

    def __init__(
        self, memory_bytes: int = DEFAULT_JOURNAL_MEMORY, *, directory: str | None = None
    ) -> None:
        if memory_bytes < 0:
            raise ValueError(f"the journal's memory budget must be >= 0, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self.directory = directory
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes kept in memory now, by every journal on this budget."""
        return self._held

    def take(self, nbytes: int) -> bool:
        """Hold ``nbytes`` if the budget has room; False when the piece must spill."""
        with self._lock:
            if self._held + nbytes > self.memory_bytes:
                return False
            self._held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


class Journal:
    """The pieces one stream folded, in memory up to its budget, then in a temporary file."""

    def __init__(self, budget: JournalBudget) -> None:
        self._budget = budget
        self._memory: list[Piece] = []
        self._held = 0
        self._last_owner: bytes | None = None
        self._fd: int | None = None  # the spill file, opened at the first spill
        self._spilled: list[tuple[str, int, np.dtype[np.generic], int]] = []

    @property
    def spilled_bytes(self) -> int:
        return sum(dtype.itemsize * size for _, _, dtype, size in self._spilled)

    def append(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        """Keep ``values`` (elements ``start..`` of ``name``); raises OSError when the spill
        file cannot be written (the journal is then as it was)."""
        owner = _immutable_owner(values)
        # Charge what the piece keeps alive: the whole received buffer, once per run of
        # pieces cut from it (a chunk's pieces arrive one after another); or a copy.
        charge = len(owner) if owner is not None else values.nbytes
        if owner is not None and owner is self._last_owner:
            charge = 0
        if self._budget.take(charge):
            self._held += charge
            self._last_owner = owner
            self._memory.append((name, start, values if owner is not None else values.copy()))
            return
        if self._fd is None:
            self._fd = _unlinked_file(self._budget.directory)
        data = np.ascontiguousarray(values).data.cast("B")
        written = 0
        try:
            while written < len(data):  # os.write may write less than asked
                written += os.write(self._fd, data[written:])
        except OSError:
            if written:  # drop the partial piece, so the file holds whole pieces only
                os.lseek(self._fd, -written, os.SEEK_END)
                os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_CUR))
            raise
        self._spilled.append((name, start, values.dtype, values.size))

    def replay(self) -> Iterator[Piece]:
        """Every piece appended (in no particular order: integer sums commute)."""
        yield from self._memory
        if self._fd is not None:
            offset = 0
            for name, start, dtype, size in self._spilled:
                nbytes = dtype.itemsize * size
                raw = os.pread(self._fd, nbytes, offset)
                if len(raw) != nbytes:
                    raise OSError(f"the upload journal is short: {len(raw)} of {nbytes} bytes")
                offset += nbytes
                yield name, start, np.frombuffer(raw, dtype=dtype)

    def close(self) -> None:
        """Drop every piece and give the memory back to the budget."""
        self._memory.clear()
        self._budget.give(self._held)
        self._held = 0
        self._last_owner = None
        self._spilled.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _immutable_owner(values: npt.NDArray[np.generic]) -> bytes | None:
    """The ``bytes`` holding ``values`` when nothing can change its elements (a read-only
    view of ``bytes``, directly or through a read-only memoryview); else None."""
    base: object = values
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return None
        base = base.base
    if isinstance(base, memoryview) and base.readonly:
        base = base.obj
    return base if isinstance(base, bytes) else None


def _unlinked_file(directory: str | None) -> int:
    """A file descriptor for a new temporary file that no path names (gone when closed)."""
    with tempfile.TemporaryFile(prefix="fedcore-journal-", dir=directory) as file:
        return os.dup(file.fileno())  # the file lives on while this descriptor is open
