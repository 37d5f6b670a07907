"""What a stream folded into the exact sum, kept so that a cut can take it back out exactly.

Almost every upload completes, and then its journal is thrown away unread; writing it costs
the coordinator a copy per byte (measured: a page-cache write costs more than the fold
itself, ``scripts/bench_fold.py``). So a journal keeps its pieces *by reference* (the
received chunk's read-only buffer, no copy) while the round's :class:`JournalBudget` allows,
and only past that budget writes them to a spill file, one unbuffered write per piece. The
coordinator's memory stays O(model): the sum, plus at most the budget of journalled pieces for
the whole round, however many uploads are in flight.

A piece kept by reference must not change while its stream is open: read-only arrays over
``bytes`` (``np.frombuffer`` of a received chunk, as the upload path makes) are kept as they
are, and charged the whole buffer they keep alive; any other array is copied first, since its
owner may reuse it.

**Spill files are reused** (:class:`SpillPool`). A fresh temporary file per upload made the
kernel allocate (and, at close, free) a page-cache page for every spilled byte, every round:
writing into a fresh file cost 1.1 ns per float32 element against 0.47 ns over pages already
cached (one loaded measurement). So a journal takes an unlinked file from a pool, writes it from
offset 0 and gives it back at close; the next upload, or the next round's, overwrites the same
pages. A reused file still holds its last user's bytes past what the new user wrote: a journal
reads only within the length it wrote itself (:class:`SpillFile`), so nothing of one upload is
ever replayed into another's take-back.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_JOURNAL_MEMORY",
    "DEFAULT_SPILL_KEEP_BYTES",
    "DEFAULT_SPILL_KEEP_FILES",
    "Journal",
    "JournalBudget",
    "SpillFile",
    "SpillPool",
    "shared_spill_pool",
]

#: Bytes of journalled pieces one round may keep in memory (all its uploads together). Small:
#: a large round spills almost all of it anyway (8 uploads of 40 MB against 16 MiB: 95%), and
#: every byte kept is a byte of the coordinator's peak (4 MiB: a model of 1M float32 whole).
DEFAULT_JOURNAL_MEMORY = 4 * 1024 * 1024

#: What an idle :class:`SpillPool` keeps, at most: bytes of file (disk blocks and reclaimable
#: page cache, not the coordinator's memory) and open files. 1 GiB holds a round of 8 uploads
#: of 100 MB, or 25 of 40 MB; a larger round truncates what is past it when its files come back.
DEFAULT_SPILL_KEEP_BYTES = 1 << 30
DEFAULT_SPILL_KEEP_FILES = 32

Piece = tuple[str, int, npt.NDArray[np.generic]]


class SpillFile:
    """An unlinked temporary file lent to one journal: written from offset 0, and read only
    within what this user wrote (a reused file holds older bytes past that). Closed by
    :meth:`close`, or once unreachable (a pool or journal dropped without closing)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: Bytes this user wrote, from offset 0: the only bytes :meth:`read` gives.
        self.length = 0
        self._closer = weakref.finalize(self, os.close, fd)

    def append(self, data: memoryview) -> int:
        """Write ``data`` after what this user wrote and return its offset. Raises OSError
        when it cannot be written whole; :attr:`length` is then as it was, so the partial
        bytes are never read and the next append overwrites them."""
        offset = self.length
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self.fd, data[written:], offset + written)
        self.length = offset + written
        return offset

    def read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` written by this user at ``offset``; refuses anything past :attr:`length`."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise ValueError(
                f"bytes {offset}..{offset + nbytes} are outside the {self.length} written"
            )
        raw = os.pread(self.fd, nbytes, offset)
        if len(raw) != nbytes:
            raise OSError(f"the upload journal is short: {len(raw)} of {nbytes} bytes")
        return raw

    def size(self) -> int:
        """The file's size, what earlier users wrote included."""
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        self._closer()


class SpillPool:
    """Unlinked spill files in ``directory`` (default ``TMPDIR``), lent to journals and kept
    when given back, so their pages are overwritten round after round instead of allocated.

    Bound: idle, it keeps at most ``keep_files`` files of at most ``keep_bytes`` in all; a
    file given back past either is truncated to what still fits, or closed. Files lent out are
    not bounded here (a journal needs all it wrote until it closes). Thread-safe.
    """

    def __init__(
        self,
        keep_bytes: int = DEFAULT_SPILL_KEEP_BYTES,
        keep_files: int = DEFAULT_SPILL_KEEP_FILES,
        *,
        directory: str | None = None,
    ) -> None:
        if keep_bytes < 0 or keep_files < 0:
            raise ValueError(f"the pool's bounds must be >= 0, got {keep_bytes}, {keep_files}")
        self.keep_bytes = keep_bytes
        self.keep_files = keep_files
        self.directory = directory
        self._free: list[tuple[SpillFile, int]] = []  # (file, size), the last given back last
        self._kept = 0
        self._lock = threading.Lock()
        #: Files lent again rather than created.
        self.reused = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes of file the idle files hold now."""
        return self._kept

    @property
    def free(self) -> int:
        """Idle files held now."""
        return len(self._free)

    def take(self) -> SpillFile:
        """A file to write from offset 0: the last one given back, else a new one (OSError
        when it cannot be created)."""
        with self._lock:
            if self._free:
                file, size = self._free.pop()
                self._kept -= size
                self.reused += 1
                file.length = 0  # a new user: nothing written yet, nothing readable
                return file
        return SpillFile(_unlinked_file(self.directory))

    def give(self, file: SpillFile) -> None:
        """Keep ``file`` for the next journal, within the pool's bound."""
        try:
            size = file.size()
            with self._lock:
                room = self.keep_bytes - self._kept
                if len(self._free) < self.keep_files and room > 0:
                    if size > room:  # keep what fits: those pages are reused next round
                        os.ftruncate(file.fd, room)
                        size = room
                    self._free.append((file, size))
                    self._kept += size
                    return
        except OSError:
            pass  # a file that cannot be measured or cut is not kept
        file.close()

    def close(self) -> None:
        """Close every idle file."""
        with self._lock:
            free, self._free, self._kept = self._free, [], 0
        for file, _ in free:
            file.close()


class JournalBudget:
    """Memory shared by the journals of one sum's streams, and the pool their spills use
    (by default the process's pool for ``directory``, :func:`shared_spill_pool`)."""

    def __init__(
        self,
        memory_bytes: int = DEFAULT_JOURNAL_MEMORY,
        *,
        directory: str | None = None,
        pool: SpillPool | None = None,
    ) -> None:
        if memory_bytes < 0:
            raise ValueError(f"the journal's memory budget must be >= 0, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self.directory = directory
        self.pool = pool if pool is not None else shared_spill_pool(directory)
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
    """The pieces one stream folded, in memory up to its budget, then in a spill file."""

    def __init__(self, budget: JournalBudget) -> None:
        self._budget = budget
        self._memory: list[Piece] = []
        self._held = 0
        self._last_owner: bytes | None = None
        self._file: SpillFile | None = None  # taken from the pool at the first spill
        self._spilled: list[tuple[str, int, np.dtype[np.generic], int]] = []

    @property
    def spilled_bytes(self) -> int:
        return self._file.length if self._file is not None else 0

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
        if self._file is None:
            self._file = self._budget.pool.take()
        self._file.append(np.ascontiguousarray(values).data.cast("B"))
        self._spilled.append((name, start, values.dtype, values.size))

    def replay(self) -> Iterator[Piece]:
        """Every piece appended (in no particular order: integer sums commute)."""
        yield from self._memory
        if self._file is not None:
            offset = 0  # the pieces lie one after another, from offset 0
            for name, start, dtype, size in self._spilled:
                nbytes = dtype.itemsize * size
                raw = self._file.read(offset, nbytes)
                offset += nbytes
                yield name, start, np.frombuffer(raw, dtype=dtype)

    def close(self) -> None:
        """Drop every piece, give the memory back to the budget and the file to its pool."""
        self._memory.clear()
        self._budget.give(self._held)
        self._held = 0
        self._last_owner = None
        self._spilled.clear()
        if self._file is not None:
            self._budget.pool.give(self._file)
            self._file = None


# One pool per spill folder for the whole process: a coordinator's rounds (and its jobs) come
# and go, and the point is that their files outlive them. A journal reads only its own
# bytes, so sharing files across jobs shares no data.
_POOLS: dict[str | None, SpillPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_spill_pool(directory: str | None = None) -> SpillPool:
    """The process's spill pool for ``directory`` (default ``TMPDIR``), with the default
    bounds (:data:`DEFAULT_SPILL_KEEP_BYTES`, :data:`DEFAULT_SPILL_KEEP_FILES`)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(directory)
        if pool is None:
            pool = _POOLS[directory] = SpillPool(directory=directory)
        return pool


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
