"""Per-scientist limit on refused queries.

The refusals that remain depend only on the query, the public schema, the silos' policies and
their ledgers (docs/analytics.md), so they release nothing about the data; they still cost the
silos work and fill their logs, and a scientist probing policies by trial and error should be
told to stop. The coordinator, which knows who asked (the silos do not), counts each scientist's
refused queries over a sliding window and, past the limit, refuses that scientist's further
queries itself, before any silo hears of them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

__all__ = ["RefusalLimiter"]


class RefusalLimiter:
    """At most ``limit`` refused queries per scientist within any ``window`` seconds.

    ``clock`` is injected so tests need not wait for a window to pass.
    """

    def __init__(
        self, *, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1:
            raise ValueError(f"the refusal limit must be at least 1, got {limit}")
        if not window > 0:
            raise ValueError(f"the refusal window must be positive, got {window}")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._refusals: dict[str, collections.deque[float]] = {}

    def _recent(self, scientist: str) -> collections.deque[float]:
        times = self._refusals.get(scientist)
        if times is None:
            return collections.deque()
        horizon = self._clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._refusals[scientist]
        return times

    def blocked_for(self, scientist: str) -> float | None:
        """Seconds until ``scientist`` may ask again, or None when they may ask now."""
        times = self._recent(scientist)
        if len(times) < self.limit:
            return None
        return max(0.0, times[-self.limit] + self.window - self._clock())

    def record(self, scientist: str) -> None:
        """Count one refused query of ``scientist``."""
        times = self._refusals.setdefault(scientist, collections.deque())
        times.append(self._clock())
        while len(times) > self.limit:  # older ones cannot matter any more
            times.popleft()
