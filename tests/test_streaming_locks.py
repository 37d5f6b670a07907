"""One stream's take-back journal write never holds up another stream's fold.

Past its memory budget a journal copies each piece into a file, which costs about as much as
the fold itself; done under the sum's lock, it serialised every upload's fold behind it.
"""

from __future__ import annotations

import threading

import numpy as np

from fedcore.strategy.fixed_point import FixedPointSum
from fedcore.strategy.journal import JournalBudget
from fedcore.strategy.streaming import UpdateStream

WAIT = 10.0  # seconds: generous bound on a fold of a few elements


class _StalledBudget(JournalBudget):
    """A journal budget whose every charge waits until released: a slow journal write."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def take(self, nbytes: int) -> bool:
        self.entered.set()
        if not self.release.wait(WAIT):
            raise AssertionError("the stalled journal was never released")
        return super().take(nbytes)


def _folded_in_time(stream: UpdateStream, values: np.ndarray) -> bool:
    done = threading.Event()

    def run() -> None:
        stream.fold("w", 0, values)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(WAIT / 2)


def test_a_stalled_journal_does_not_block_other_streams() -> None:
    total = FixedPointSum(10)
    total.declare("w", (4,), np.dtype(np.float32))
    stalled = _StalledBudget()
    slow = UpdateStream(total, 1.0, journal=stalled)
    fast = UpdateStream(total, 2.0, journal=JournalBudget())
    values = np.arange(4, dtype=np.float32)
    # Positive control: the harness sees a fold finish when nothing stalls.
    assert _folded_in_time(fast, values)

    slow_thread = threading.Thread(target=slow.fold, args=("w", 0, values), daemon=True)
    slow_thread.start()
    assert stalled.entered.wait(WAIT)  # the slow stream is inside its journal write
    assert _folded_in_time(fast, values)  # ... and another stream still folds
    stalled.release.set()
    slow_thread.join(WAIT)
    assert not slow_thread.is_alive()
    assert slow.commit()
    assert fast.commit()
    # Every fold counted once: 1 x values + 2 x (values twice).
    np.testing.assert_allclose(np.asarray(total.total()["w"], np.float64), 5 * values)


def test_an_abort_during_another_streams_journal_write_is_exact() -> None:
    total = FixedPointSum(10)
    total.declare("w", (4,), np.dtype(np.float32))
    stalled = _StalledBudget()
    slow = UpdateStream(total, 1.0, journal=stalled)
    cut = UpdateStream(total, 3.0, journal=JournalBudget())
    values = np.arange(4, dtype=np.float32)
    slow_thread = threading.Thread(target=slow.fold, args=("w", 0, values), daemon=True)
    slow_thread.start()
    assert stalled.entered.wait(WAIT)
    assert _folded_in_time(cut, values)
    cut.abort()  # taken back while the slow stream's write is under way
    stalled.release.set()
    slow_thread.join(WAIT)
    assert slow.commit()
    assert not cut.commit()
    np.testing.assert_allclose(np.asarray(total.total()["w"], np.float64), values)
