"""An update spooled to disk as its pieces arrive, then read back range by range.

Rules that cannot fold an update into a running sum piece by piece (a coordinate-wise median
needs every update's value of a coordinate at once; an enforced L2 clip needs the whole
update's norm before it may scale any of it) still need not hold updates in memory: each
arriving piece is checked and written at its place in an unlinked temporary file, and the rule
later reads the spooled updates back one range of elements at a time. The coordinator then
holds one range per update (O(updates x range)) and its result, never whole updates; the disk
holds one model per spooled update. Aborting an upload closes its file: nothing of it was
counted anywhere, so nothing needs taking back.

FedBuff's engine spools the same way so that its uploads need no upload slot: each is read
back whole (:meth:`SpooledUpdate.weights`), one at a time, when it is folded into the buffer.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError
from fedcore.weights import Weights

from .base import Layout

__all__ = ["RANGE_BYTES", "SpooledUpdate"]

#: Bytes of one update's range read back at a time: large enough that a read costs little
#: more than the copy, small enough that many updates' ranges fit in the CPU's cache.
RANGE_BYTES = 1 << 18


def _finite_squares(flat: npt.NDArray[np.generic]) -> bool:
    floats: npt.NDArray[np.floating] = flat  # type: ignore[assignment]
    # einsum's own loop, not BLAS: a threaded BLAS dot crawls on a loaded machine.
    return bool(np.isfinite(np.einsum("i,i->", floats, floats)))


class SpooledUpdate:
    """One update written piece by piece to an unlinked temporary file (a
    :class:`~.base.PieceSink`).

    The file is laid out as the payload: each tensor of ``layout`` at its own offset, so a
    piece is written where it belongs and :meth:`read` returns any range of a tensor. Pieces of
    one tensor must arrive in order and without gaps (as an upload's chunks do); a floating
    piece that is not finite is refused. ``fold`` may run in a worker thread.
    """

    def __init__(self, layout: Layout, *, spool_dir: str | None = None) -> None:
        self.layout = dict(layout)
        self._offsets: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in self.layout.items():
            size = int(np.prod(shape, dtype=np.int64))
            self._offsets[name] = offset
            self._sizes[name] = size
            offset += size * dtype.itemsize
        self._received = dict.fromkeys(self.layout, 0)
        self._spool_dir = spool_dir
        self._file: BinaryIO | None = None  # created at the first piece
        self._lock = threading.Lock()
        self.state = "open"

    @property
    def complete(self) -> bool:
        """Whether every element of every tensor was folded."""
        return self._received == self._sizes

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        """Write ``values`` (elements ``start..`` of tensor ``name``); False when the update
        was closed meanwhile. Refuses (PayloadError) a piece out of place or not finite."""
        spec = self.layout.get(name)
        if spec is None:
            raise PayloadError(f"the update has no tensor {name!r}")
        dtype = spec[1]
        flat = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
        # A finite sum of squares proves every element finite; only then is it looked at whole.
        finite = dtype.kind != "f" or _finite_squares(flat) or bool(np.isfinite(flat).all())
        if not finite:
            raise PayloadError(f"tensor {name!r} contains NaN or Inf; the update is refused")
        with self._lock:
            if self.state != "open":
                return False
            if start != self._received[name] or start + flat.size > self._sizes[name]:
                raise PayloadError(
                    f"tensor {name!r}: a piece of {flat.size} elements at {start} does not "
                    f"follow the {self._received[name]} received, or overruns its "
                    f"{self._sizes[name]}"
                )
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115
                # A round that fails never reads its updates: their files close with them.
                weakref.finalize(self, self._file.close)
            try:
                os.pwrite(
                    self._file.fileno(), flat.data, self._offsets[name] + start * dtype.itemsize
                )
            except OSError as exc:
                raise PayloadError(f"the update spool could not be written: {exc}") from exc
            self._received[name] += flat.size
        return True

    def commit(self) -> bool:
        """Keep the spooled update for reading; False when it was aborted first. Refuses
        (PayloadError) and drops an update with elements missing."""
        with self._lock:
            if self.state != "open":
                return False
            if not self.complete:
                self.state = "aborted"
                self._close()
                raise PayloadError("the update ended before all of its elements arrived")
            self.state = "committed"
        return True

    def abort(self) -> None:
        """Drop the update (its file is deleted); a later ``fold`` is ignored."""
        with self._lock:
            if self.state == "open":
                self.state = "aborted"
                self._close()

    def close(self) -> None:
        """Delete the spool once the rule has read what it needs."""
        with self._lock:
            self.state = "closed"
            self._close()

    def read(self, name: str, start: int, count: int) -> npt.NDArray[np.generic]:
        """Elements ``start..start+count`` of tensor ``name`` (flat), once every element is in
        (committed, or complete and still open). Holds the update's lock, so an abort from
        another thread waits for the read to end."""
        dtype = self.layout[name][1]
        with self._lock:
            if not (self.state == "committed" or (self.state == "open" and self.complete)):
                raise ValueError(f"only a complete update can be read, this one is {self.state}")
            out = np.empty(count, dtype=dtype)
            if count == 0:
                return out
            assert self._file is not None
            want = count * dtype.itemsize
            got = os.preadv(
                self._file.fileno(),
                [out.data.cast("B")],
                self._offsets[name] + start * dtype.itemsize,
            )
        if got != want:
            raise OSError(f"the update spool returned {got} bytes of {want}")
        return out

    def weights(self) -> Weights:
        """The whole update read back, each tensor in its shape (one model in memory), once
        every element is in (see :meth:`read`)."""
        return {
            name: self.read(name, 0, self._sizes[name]).reshape(shape)
            for name, (shape, _) in self.layout.items()
        }

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
