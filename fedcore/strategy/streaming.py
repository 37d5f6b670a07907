"""Streaming aggregation: updates folded piece by piece as their chunks arrive.

A strategy declares how it needs updates (:class:`UpdateAccess`); one that takes them as a
stream returns a :class:`~.base.StreamingAggregator` from ``start_aggregation``. The
coordinator then tells it the round's weight budget (``expect``), opens one
:class:`UpdateStream` per upload and folds each checked piece into the running sum the moment
it arrives; no upload is staged whole, so any number of uploads proceed at once while the
coordinator holds the sum, the global model and the chunks in flight.

An upload that is cut off, or found bad part-way, is taken back out *exactly*: the stream
keeps a journal of the values it folded, in an unlinked temporary file (so the coordinator's
memory stays O(model) however many uploads are in flight), and :meth:`UpdateStream.abort`
subtracts the same integers again (:mod:`.fixed_point`). A committed stream's journal is
dropped at once.
"""

from __future__ import annotations

import enum
import tempfile
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError

from .fixed_point import FixedPointSum

__all__ = ["UpdateAccess", "UpdateStream"]


class UpdateAccess(enum.Enum):
    """How a strategy's aggregation needs the round's updates (and so its memory)."""

    #: Piece by piece, as chunks arrive: weighted sums fold into O(model) however many
    #: workers; median, trimmed mean and the DP wrapper spool pieces to disk (:mod:`.spool`).
    STREAM = "stream"
    #: Each update whole, kept until the round's rule runs on all of them (Krum, custom
    #: rules): O(workers x model).
    WHOLE = "whole"


class UpdateStream:
    """One update being folded into a :class:`FixedPointSum`, piece by piece.

    ``fold`` may run in worker threads; ``abort`` after ``commit`` (or twice) does nothing,
    and a piece folded after ``abort`` is ignored, so a round that closes while an upload is
    still arriving cannot leave part of it in the sum.
    """

    def __init__(self, total: FixedPointSum, weight: float, *, journal_dir: str | None) -> None:
        self._sum = total
        self.weight = float(weight)
        with total.lock:
            total.reserve(self.weight)
        self._journal_dir = journal_dir
        self._journal: BinaryIO | None = None  # opened at the first piece
        self._pieces: list[tuple[str, int, np.dtype[np.generic], int]] = []
        self.state = "open"

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        """Fold ``values`` (elements ``start..`` of tensor ``name``); False when the stream
        was closed meanwhile. Refuses (PayloadError) a piece out of range: nothing of it is
        folded, and the caller aborts the stream."""
        flat = np.ascontiguousarray(values).reshape(-1)
        with self._sum.lock:
            if self.state != "open":
                return False
            if self._journal is None:
                self._journal = tempfile.TemporaryFile(dir=self._journal_dir)  # noqa: SIM115
            self._sum.fold(name, start, flat, self.weight, +1)
            try:
                self._journal.write(flat.data)
            except OSError as exc:
                self._sum.fold(name, start, flat, self.weight, -1)
                raise PayloadError(f"the upload journal could not be written: {exc}") from exc
            self._pieces.append((name, start, flat.dtype, flat.size))
        return True

    def commit(self) -> bool:
        """Keep everything folded; False when the stream was aborted first."""
        with self._sum.lock:
            if self.state != "open":
                return False
            self.state = "committed"
            self._close_journal()
        return True

    def abort(self) -> None:
        """Take back, exactly, every piece folded so far."""
        with self._sum.lock:
            if self.state != "open":
                return
            if self._journal is not None:
                journal = self._journal
                journal.seek(0)
                for name, start, dtype, size in self._pieces:
                    values = np.frombuffer(journal.read(size * dtype.itemsize), dtype=dtype)
                    self._sum.fold(name, start, values, self.weight, -1)
            self._sum.release(self.weight)
            self.state = "aborted"
            self._close_journal()

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._pieces.clear()
