"""The network console's view of a standing network (``fed-server --serve --console``).

:class:`StandingNetworkView` reads the network's job store (the same rows ``fed-job status``
and ``fed-job logs`` read: states, messages, log lines and each completed round's metrics),
its connected workers and the process's recent logs; it is a
:class:`~.console_view.NetworkView`. It is also the console's :class:`~.console_view.ScientistAccess`:
a data scientist signs in with their ``fed-job`` token, checked against the scientists'
enrolment as the Jobs service checks it (re-read when the file changes, so a revoked scientist
is signed out at their next page), and may stop a job through the Jobs service's own
:meth:`~.jobs.service.JobsService.request_stop` (audited).

Everything here runs on the event loop's thread: the job store's one SQLite connection lives
there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import fields

from fedcore.console.logbuffer import LogLine, RecentLogs
from fedcore.enrollment import Enrollment
from fedcore.errors import ConfigError

from .console_view import JobLogEntry, JobSummary
from .jobs.store import JobRecord, JobStore
from .reporting.metrics import RoundMetrics
from .reporting.roster import ConnectedWorker

__all__ = ["StandingNetworkView"]

log = logging.getLogger("fedcore.server")

_ROW_FIELDS = frozenset(f.name for f in fields(RoundMetrics))
#: Rounds plotted per job at most (the newest).
MAX_ROUNDS_SHOWN = 2000
#: Jobs the overview lists at most (the newest): each costs a read of its log.
MAX_JOBS_LISTED = 100


def _round(text: str) -> RoundMetrics | None:
    """A job log line's metrics row as :class:`RoundMetrics` (None when it is not one)."""
    try:
        row = json.loads(text)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    try:
        # Keys this version does not know (a newer row) are left out, not fatal.
        return RoundMetrics(**{k: v for k, v in row.items() if k in _ROW_FIELDS})
    except TypeError:
        return None


def _name(record: JobRecord) -> str:
    """What a job is, in a few words (its settings are the scientist's: shown escaped)."""
    if record.kind == "query":
        query = record.settings.get("query")
        return f"query {query}" if isinstance(query, str) else "query"
    model = record.settings.get("model", "?")
    strategy = record.settings.get("strategy", "fedavg")
    return f"{model} · {strategy}"


class StandingNetworkView:
    """The console's view of a standing network's jobs, workers and logs.

    Args:
        store: the network's job store.
        scientists: the scientists' enrolment (the Jobs service's).
        stop: stops a job for a scientist (``JobsService.request_stop``).
        roster: who is connected.
        logs: the process's recent log lines.
    """

    def __init__(
        self,
        store: JobStore,
        scientists: Enrollment,
        stop: Callable[[str, str], object],
        roster: Callable[[], list[ConnectedWorker]],
        logs: RecentLogs,
    ) -> None:
        self._store = store
        self._scientists = scientists
        self._stop = stop
        self._roster = roster
        self._logs = logs

    # ------------------------------------------------------------------ NetworkView

    def jobs(self, studies: frozenset[str] | None = None) -> list[JobSummary]:
        connected = len(self._roster())
        newest = list(reversed(self._store.all(studies)))[:MAX_JOBS_LISTED]
        return [self._summary(r, connected) for r in newest]

    def job(self, job_id: str) -> JobSummary | None:
        try:
            record = self._store.get(job_id)
        except KeyError:
            return None
        return self._summary(record, len(self._roster()))

    def _summary(self, record: JobRecord, connected: int) -> JobSummary:
        events = self._store.events(record.id)
        rows = [r for r in (_round(e.metrics) for e in events if e.metrics) if r is not None]
        last = events[-1].time if events else record.created
        end = last if record.final else time.time()
        epsilon = next((r.epsilon for r in reversed(rows) if r.epsilon is not None), None)
        return JobSummary(
            id=record.id,
            name=_name(record),
            phase=record.state,
            round=record.rounds_done,
            rounds=record.rounds,
            rounds_completed=record.rounds_done,
            connected=connected,
            training=0,
            reported=0,
            bytes_sent=sum(r.bytes_sent for r in rows),
            bytes_received=sum(r.bytes_received for r in rows),
            elapsed_s=max(end - record.created, 0.0),
            epsilon=epsilon,
            study=record.study,
            scientist=record.scientist,
            kind=record.kind,
            message=record.message,
            final=record.final,
        )

    def job_rounds(self, job_id: str) -> list[RoundMetrics] | None:
        try:
            self._store.get(job_id)
        except KeyError:
            return None
        rows = (_round(e.metrics) for e in self._store.events(job_id) if e.metrics)
        return [r for r in rows if r is not None][-MAX_ROUNDS_SHOWN:]

    def job_log(self, job_id: str) -> list[JobLogEntry]:
        return [JobLogEntry(e.time, e.text) for e in self._store.events(job_id)]

    def workers(self) -> list[ConnectedWorker]:
        return self._roster()

    def logs(self, query: str = "") -> list[LogLine]:
        return self._logs.lines(query)

    # ------------------------------------------------------------------ ScientistAccess

    def _reload(self) -> bool:
        try:
            self._scientists.reload()
        except ConfigError as exc:
            log.error("cannot read the scientists' enrollment: %s", exc)
            return False
        return True

    def identify(self, token: str) -> str | None:
        return self._scientists.identify(token) if self._reload() else None

    def studies(self, scientist: str) -> frozenset[str] | None:
        if not self._reload():
            return None
        entry = self._scientists.get(scientist)
        if entry is None or entry.revoked:
            return None
        return frozenset(entry.studies)

    def stop(self, job_id: str, scientist: str) -> None:
        self._stop(job_id, scientist)
