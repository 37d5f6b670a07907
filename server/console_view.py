"""What the network console shows: a narrow, read-only view of a coordinator.

:class:`NetworkView` is the interface the console's pages read: jobs (today one coordinator
runs one federation, so one job), each job's rounds, the connected workers and recent logs.
:class:`FederationView` implements it for today's :class:`~.coordinator.Coordinator` from its
public reporting: it is a :class:`~.reporting.sink.Sink` (the progress snapshots and completed
rounds every display receives) plus the coordinator's roster. A coordinator running several
jobs implements the same protocol; the pages do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedcore.console.logbuffer import LogLine, RecentLogs

from .reporting.metrics import CoordinatorStatus, RoundMetrics
from .reporting.roster import ConnectedWorker

__all__ = ["FederationView", "JobSummary", "NetworkView"]

#: Rounds kept per job for the charts (the newest).
MAX_ROUNDS_KEPT = 2000


@dataclass(frozen=True)
class JobSummary:
    """One job (a federation) as the console lists it."""

    id: str
    name: str
    phase: str
    round: int
    rounds: int
    rounds_completed: int
    connected: int
    training: int
    reported: int
    bytes_sent: int
    bytes_received: int
    elapsed_s: float
    epsilon: float | None


class NetworkView(Protocol):
    """The network console's source (read-only; called on the event loop, must not block)."""

    def jobs(self) -> list[JobSummary]:
        """Every job, running or finished."""
        ...

    def job_rounds(self, job_id: str) -> list[RoundMetrics] | None:
        """The completed rounds of job ``job_id`` (None: no such job)."""
        ...

    def workers(self) -> list[ConnectedWorker]:
        """The workers connected now."""
        ...

    def logs(self, query: str = "") -> list[LogLine]:
        """Recent log lines containing ``query``, newest first."""
        ...


class FederationView:
    """:class:`NetworkView` of one coordinator's federation; add it to the coordinator's sinks.

    Args:
        name: the federation's name (model and strategy).
        roster: the coordinator's ``roster`` (who is connected).
        logs: the process's recent log lines.
        rows: the rounds completed before the view was added (a resumed federation's).
    """

    JOB_ID = "federation"

    def __init__(
        self,
        name: str,
        roster: Callable[[], list[ConnectedWorker]],
        logs: RecentLogs,
        rows: Sequence[RoundMetrics] = (),
    ) -> None:
        self.name = name
        self._roster = roster
        self._logs = logs
        self._status: CoordinatorStatus | None = None
        self._rounds: list[RoundMetrics] = list(rows)[-MAX_ROUNDS_KEPT:]

    # ------------------------------------------------------------------ Sink

    def update(self, status: CoordinatorStatus) -> None:
        self._status = status

    def round_completed(self, metrics: RoundMetrics) -> None:
        self._rounds.append(metrics)
        del self._rounds[:-MAX_ROUNDS_KEPT]

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        self._status = status
        self._rounds = list(rows)[-MAX_ROUNDS_KEPT:]

    # ------------------------------------------------------------------ NetworkView

    def jobs(self) -> list[JobSummary]:
        s = self._status
        if s is None:
            return []
        epsilon = next((r.epsilon for r in reversed(self._rounds) if r.epsilon is not None), None)
        return [
            JobSummary(
                self.JOB_ID,
                self.name,
                s.phase,
                s.round,
                s.rounds,
                s.rounds_completed,
                s.connected,
                s.training,
                s.reported,
                s.bytes_sent,
                s.bytes_received,
                s.elapsed_s,
                epsilon,
            )
        ]

    def job_rounds(self, job_id: str) -> list[RoundMetrics] | None:
        return list(self._rounds) if job_id == self.JOB_ID else None

    def workers(self) -> list[ConnectedWorker]:
        return self._roster()

    def logs(self, query: str = "") -> list[LogLine]:
        return self._logs.lines(query)
