"""Workers waiting on their data owner's approval of the plan, for the asynchronous engine.

A worker that answers "awaiting approval" is not a failure: it is asked again after a delay
that doubles from :data:`APPROVAL_POLL_FIRST` to ``--approval-poll`` seconds, until it
trains (approved), refuses (denied: the silo is left out of the federation) or
``--approval-timeout`` passes since its first such answer (left out too). The synchronous
engine waits inside a round instead and shares only the delays.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["APPROVAL_POLL_FIRST", "APPROVAL_POLL_MOST", "ApprovalWaits"]

#: Seconds before asking a worker awaiting its owner's approval again, doubling up to the most.
APPROVAL_POLL_FIRST = 2.0
APPROVAL_POLL_MOST = 30.0


@dataclass
class _Wait:
    name: str
    deadline: float  # when its owner's time to decide is up
    delay: float  # the wait before the next ask
    next_ask: float


class ApprovalWaits:
    """Who waits on an owner's decision, when to ask each again, and who is left out.

    Keyed by the coordinator's worker id; times are the caller's clock (monotonic seconds).
    """

    def __init__(self, timeout: float, most: float = APPROVAL_POLL_MOST) -> None:
        self.timeout = timeout
        self.most = most  # ``--approval-poll``: the longest wait between asks
        self._waits: dict[str, _Wait] = {}
        self._reviewed: set[str] = set()  # workers whose owner reviews this plan
        #: Worker id -> why it is left out of the federation (denied, or no decision in time).
        self.left_out: dict[str, str] = {}

    def awaiting(self, worker_id: str, name: str, now: float) -> float | None:
        """Record an "awaiting approval" answer; the seconds until it is asked again, or None
        when ``--approval-timeout`` has passed (the worker is then left out)."""
        self._reviewed.add(worker_id)
        wait = self._waits.get(worker_id)
        if wait is None:
            wait = _Wait(name, now + self.timeout, min(APPROVAL_POLL_FIRST, self.most), now)
            self._waits[worker_id] = wait
        else:
            wait.delay = min(2 * wait.delay, self.most)
        if now >= wait.deadline:
            del self._waits[worker_id]
            self.left_out[worker_id] = (
                f"no decision on the plan within --approval-timeout {self.timeout:g} s"
            )
            return None
        wait.next_ask = min(now + wait.delay, wait.deadline)
        return wait.next_ask - now

    def settled(self, worker_id: str) -> None:
        """The worker delivered a result: its owner approved."""
        self._waits.pop(worker_id, None)

    def refused(self, worker_id: str, reason: str) -> bool:
        """A refusal; True (and the worker is left out) when its owner reviews the plan (it
        answered "awaiting approval" before): the owner denied it, before or after approving,
        and the same plan would be refused again."""
        self._waits.pop(worker_id, None)
        if worker_id not in self._reviewed:
            return False
        self.left_out[worker_id] = reason
        return True

    def may_ask(self, worker_id: str, now: float) -> bool:
        """Whether the worker may be given a task now."""
        if worker_id in self.left_out:
            return False
        wait = self._waits.get(worker_id)
        return wait is None or now >= wait.next_ask

    def names(self) -> list[str]:
        """The workers waiting on their owners."""
        return [w.name for w in self._waits.values()]

    def next_ask(self, now: float) -> float | None:
        """The earliest time after ``now`` some waiting worker is to be asked again."""
        return min((w.next_ask for w in self._waits.values() if w.next_ask > now), default=None)

    def keep_only(self, worker_ids: set[str]) -> None:
        """Forget the waits of workers that left (one that reconnects is a new session)."""
        self._waits = {k: w for k, w in self._waits.items() if k in worker_ids}

    def deadline(self) -> float | None:
        """The latest time some owner may still decide (None: nobody is waiting)."""
        return max((w.deadline for w in self._waits.values()), default=None)
