"""The standing network's jobs, kept in an embedded SQLite database (``STATE_DIR/jobs.db``).

Every change is committed before the coordinator acts on it (WAL mode, ``synchronous=FULL``),
so a ``kill -9`` loses no job: on restart, :meth:`JobStore.recover` puts the jobs that were
running back at the head of the queue (they resume from their last checkpoint) and queued jobs
keep their place (the queue is ordered by submission sequence). Job logs are rows too
(:meth:`log`, :meth:`events`), so ``fed-job logs`` survives restarts. Only what a job *is*
lives here; a running job's model and strategy state are its checkpoint's. A job's bytes are
the sum of its rounds' (:meth:`record_round` adds each round's in the same transaction as its
row), so a job resumed after a restart counts on from there.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ACTIVE", "FINAL", "JobRecord", "JobStore", "LogLine"]

#: States of a job that is over.
FINAL = frozenset({"completed", "stopped", "failed", "denied"})
#: States of a job the scheduler is running.
ACTIVE = frozenset({"running", "awaiting-approval"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    study TEXT NOT NULL,
    scientist TEXT NOT NULL,
    kind TEXT NOT NULL,
    settings TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    rounds_done INTEGER NOT NULL DEFAULT 0,
    rounds INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '',
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    bytes_received INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    text TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""

#: Columns added since the first release, with their definitions: a store written before
#: them gains them when it is opened.
_ADDED_COLUMNS = {
    "bytes_sent": "INTEGER NOT NULL DEFAULT 0",
    "bytes_received": "INTEGER NOT NULL DEFAULT 0",
}


@dataclass(frozen=True)
class JobRecord:
    """One job as stored."""

    id: str
    seq: int
    study: str
    scientist: str
    kind: str
    settings: dict[str, Any]
    state: str
    message: str
    rounds_done: int
    rounds: int
    created: float
    stop_requested: bool
    result: str
    #: Bytes the job's recorded rounds moved, in all, across restarts.
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class LogLine:
    """One line of a job's log."""

    seq: int
    time: float
    text: str
    metrics: str


class JobStore:
    """The jobs table and their logs. One connection, used from the event loop's thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, *args: object) -> Iterator[JobRecord]:
        for row in self._db.execute(
            "SELECT id, seq, study, scientist, kind, settings, state, message, rounds_done, "
            f"rounds, created, stop_requested, result, bytes_sent, bytes_received FROM jobs {sql}",
            args,
        ):
            yield JobRecord(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                json.loads(row[5]),
                row[6],
                row[7],
                row[8],
                row[9],
                row[10],
                bool(row[11]),
                row[12],
                row[13],
                row[14],
            )

    def submit(
        self, *, study: str, scientist: str, kind: str, settings: dict[str, Any], rounds: int
    ) -> JobRecord:
        """A new queued job, at the end of the queue."""
        job_id = uuid.uuid4().hex[:12]
        self._db.execute(
            "INSERT INTO jobs (id, study, scientist, kind, settings, state, rounds, created) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
            (job_id, study, scientist, kind, json.dumps(settings), rounds, time.time()),
        )
        self.log(job_id, f"submitted by {scientist} in study {study}")
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job ``job_id``. Raises KeyError when there is none."""
        for record in self._rows("WHERE id = ?", job_id):
            return record
        raise KeyError(job_id)

    def all(self, studies: frozenset[str] | None = None) -> list[JobRecord]:
        """Every job in submission order (only those of ``studies`` when given)."""
        records = list(self._rows("ORDER BY seq"))
        if studies is None:
            return records
        return [r for r in records if r.study in studies]

    def queued(self) -> list[JobRecord]:
        """The jobs waiting to run, in queue order."""
        return list(self._rows("WHERE state = 'queued' ORDER BY seq"))

    def set_state(self, job_id: str, state: str, message: str = "") -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, message = ? WHERE id = ?", (state, message, job_id)
        )

    def set_running(self, job_id: str, message: str) -> None:
        """Mark a job running, unless it has ended meanwhile (a late report)."""
        self._db.execute(
            "UPDATE jobs SET state = 'running', message = ? WHERE id = ? "
            "AND state NOT IN ('completed', 'stopped', 'failed', 'denied')",
            (message, job_id),
        )

    def record_round(
        self,
        job_id: str,
        round_number: int,
        text: str,
        row: str,
        *,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        """A completed round: its log line, the job's progress and its bytes added to the
        job's, in one transaction (a kill between them would log the round again, or count
        its bytes twice, when the job resumes)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO events (job_id, time, text, metrics) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), text, row),
            )
            self._db.execute(
                "UPDATE jobs SET rounds_done = ?, result = ?, bytes_sent = bytes_sent + ?, "
                "bytes_received = bytes_received + ? WHERE id = ?",
                (round_number, row, bytes_sent, bytes_received, job_id),
            )

    def set_result(self, job_id: str, result: str) -> None:
        self._db.execute("UPDATE jobs SET result = ? WHERE id = ?", (result, job_id))

    def request_stop(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ?", (job_id,))

    def recover(self) -> list[JobRecord]:
        """After a restart: the jobs that were running, queued again (their ``seq`` keeps
        them ahead of later submissions). Returns them."""
        interrupted = [r for r in self._rows("ORDER BY seq") if r.state in ACTIVE]
        for record in interrupted:
            self.set_state(record.id, "queued", "the coordinator restarted: resuming")
            self.log(record.id, "the coordinator restarted; the job resumes from its checkpoint")
        return interrupted

    def log(self, job_id: str, text: str, metrics: str = "") -> None:
        self._db.execute(
            "INSERT INTO events (job_id, time, text, metrics) VALUES (?, ?, ?, ?)",
            (job_id, time.time(), text, metrics),
        )

    def events(self, job_id: str, after: int = 0) -> list[LogLine]:
        return [
            LogLine(*row)
            for row in self._db.execute(
                "SELECT seq, time, text, metrics FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq",
                (job_id, after),
            )
        ]
