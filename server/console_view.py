"""What the network console shows: a narrow, read-only view of a coordinator.

:class:`NetworkView` is the interface the console's pages read: jobs (of some studies, or
all), each job's rounds and log, the connected workers and recent logs. :class:`FederationView`
implements it for a one-shot :class:`~.coordinator.Coordinator` (one federation, one job) from
its public reporting: it is a :class:`~.reporting.sink.Sink` (the progress snapshots and
completed rounds every display receives) plus the coordinator's roster. A standing network's
implementation is :class:`~.console_jobs.StandingNetworkView`, which also lets data scientists
sign in (:class:`ScientistAccess`); the pages are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedcore.console.logbuffer import LogLine, RecentLogs

from .reporting.metrics import CoordinatorStatus, RoundMetrics
from .reporting.roster import ConnectedWorker

__all__ = ["FederationView", "JobLogEntry", "JobSummary", "NetworkView", "ScientistAccess"]

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
    #: A standing network's job: its study, who submitted it, ``train`` or ``query``, and
    #: what it is doing in words ("awaiting approval at 1 of 2 silos (...)").
    study: str = ""
    scientist: str = ""
    kind: str = "train"
    message: str = ""
    #: Over (completed, stopped, failed, denied; a federation finished): nothing to stop.
    final: bool = False


@dataclass(frozen=True)
class JobLogEntry:
    """One line of a job's own log (what ``fed-job logs`` shows)."""

    time: float
    text: str


class NetworkView(Protocol):
    """The network console's source (read-only; called on the event loop, must not block)."""

    def jobs(self, studies: frozenset[str] | None = None) -> list[JobSummary]:
        """The jobs, running or finished, newest first (only those of ``studies`` when given;
        a view may list only the newest ones)."""
        ...

    def job(self, job_id: str) -> JobSummary | None:
        """Job ``job_id`` (None: no such job)."""
        ...

    def job_rounds(self, job_id: str) -> list[RoundMetrics] | None:
        """The completed rounds of job ``job_id`` (None: no such job)."""
        ...

    def job_log(self, job_id: str) -> list[JobLogEntry]:
        """Job ``job_id``'s own log, oldest first (empty when it keeps none)."""
        ...

    def workers(self) -> list[ConnectedWorker]:
        """The workers connected now."""
        ...

    def logs(self, query: str = "") -> list[LogLine]:
        """Recent log lines containing ``query``, newest first."""
        ...


class ScientistAccess(Protocol):
    """Data scientists on a console (a standing network's): who holds a token, their studies
    now, and the one thing they may do there, stop their own job (as ``fed-job stop``)."""

    def identify(self, token: str) -> str | None:
        """The enrolled, unrevoked scientist holding ``token`` (constant time), or None."""
        ...

    def studies(self, scientist: str) -> frozenset[str] | None:
        """``scientist``'s studies as enrolled now; None once revoked or removed."""
        ...

    def stop(self, job_id: str, scientist: str) -> None:
        """Stop job ``job_id`` for ``scientist`` (audited, like ``fed-job stop``)."""
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

    def jobs(self, studies: frozenset[str] | None = None) -> list[JobSummary]:
        s = self._status
        if s is None or studies is not None:  # a one-shot federation belongs to no study
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
                final=s.phase == "finished",
            )
        ]

    def job(self, job_id: str) -> JobSummary | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def job_rounds(self, job_id: str) -> list[RoundMetrics] | None:
        return list(self._rounds) if job_id == self.JOB_ID else None

    def job_log(self, job_id: str) -> list[JobLogEntry]:
        return []  # a one-shot federation's log is the process's (the Logs page)

    def workers(self) -> list[ConnectedWorker]:
        return self._roster()

    def logs(self, query: str = "") -> list[LogLine]:
        return self._logs.lines(query)
