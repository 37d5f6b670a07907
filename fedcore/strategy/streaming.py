"""Streaming aggregation: updates folded piece by piece as their chunks arrive.

A strategy declares how it needs updates (:class:`UpdateAccess`); one that takes them as a
stream returns a :class:`~.base.StreamingAggregator` from ``start_aggregation``. The
coordinator then tells it the round's weight budget (``expect``), opens one
:class:`UpdateStream` per upload and folds each checked piece into the running sum the moment
it arrives; no upload is staged whole, so any number of uploads proceed at once while the
coordinator holds the sum, the global model and the chunks in flight.

An upload that is cut off, or found bad part-way, is taken back out *exactly*: the stream
keeps a journal of the values it folded (:mod:`.journal`: the received pieces by reference up
to a memory budget shared by the sum's streams, past it an unlinked spill file reused across
uploads and rounds, so the coordinator's memory stays O(model) however many uploads are in
flight), and
:meth:`UpdateStream.abort` subtracts the same integers again (:mod:`.fixed_point`). A
committed stream's journal is dropped at once, mostly unwritten.
"""

from __future__ import annotations

import enum
import threading
import weakref

import numpy as np
import numpy.typing as npt

from fedcore.errors import PayloadError

from .fixed_point import FixedPointSum
from .journal import Journal, JournalBudget

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

    def __init__(
        self,
        total: FixedPointSum,
        weight: float,
        *,
        journal_dir: str | None = None,
        journal: JournalBudget | None = None,
    ) -> None:
        """``journal``: the memory budget (and spill folder) this stream's take-back journal
        shares; by default one per ``total`` (:data:`~.journal.DEFAULT_JOURNAL_MEMORY`,
        spilling to ``journal_dir``)."""
        self._sum = total
        self.weight = float(weight)
        with total.lock:
            total.reserve(self.weight)
            budget = journal if journal is not None else _shared_budget(total, journal_dir)
        self._journal = Journal(budget)
        # Orders this stream's fold, commit and abort; taken before the sum's lock, which is
        # held only while the sum changes. So one stream's journal write (a page-cache copy
        # past the memory budget, as costly as the fold) runs while other streams fold.
        self._lock = threading.Lock()
        self.state = "open"

    def fold(self, name: str, start: int, values: npt.NDArray[np.generic]) -> bool:
        """Fold ``values`` (elements ``start..`` of tensor ``name``); False when the stream
        was closed meanwhile. Refuses (PayloadError) a piece out of range: nothing of it is
        folded, and the caller aborts the stream. A read-only ``values`` over ``bytes`` is
        journalled by reference (:mod:`.journal`)."""
        flat = values.reshape(-1)
        with self._lock:
            if self.state != "open":
                return False
            with self._sum.lock:
                self._sum.fold(name, start, flat, self.weight, +1)
            try:
                self._journal.append(name, start, flat)
            except OSError as exc:
                with self._sum.lock:
                    self._sum.fold(name, start, flat, self.weight, -1)
                raise PayloadError(f"the upload journal could not be written: {exc}") from exc
        return True

    def commit(self) -> bool:
        """Keep everything folded; False when the stream was aborted first."""
        with self._lock:
            if self.state != "open":
                return False
            self.state = "committed"
            self._journal.close()
        return True

    def abort(self) -> None:
        """Take back, exactly, every piece folded so far."""
        with self._lock:
            if self.state != "open":
                return
            with self._sum.lock:
                for name, start, values in self._journal.replay():
                    self._sum.fold(name, start, values, self.weight, -1)
                self._sum.release(self.weight)
            self.state = "aborted"
            self._journal.close()


# One journal budget per sum, for streams opened without one: the round's uploads share it.
_BUDGETS: weakref.WeakKeyDictionary[FixedPointSum, JournalBudget] = weakref.WeakKeyDictionary()


def _shared_budget(total: FixedPointSum, journal_dir: str | None) -> JournalBudget:
    """The default budget of ``total``'s streams (the caller holds ``total.lock``)."""
    budget = _BUDGETS.get(total)
    if budget is None or budget.directory != journal_dir:
        budget = _BUDGETS[total] = JournalBudget(directory=journal_dir)
    return budget
