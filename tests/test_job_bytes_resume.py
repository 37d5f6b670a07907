"""A job's bytes across a coordinator restart (issue 24): the job store adds each round's
bytes with its row, a resumed job's counter opens at that sum, and ``fed-job status`` shows
it while the job waits to run again."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from fedcore.server.jobs.service import job_info
from fedcore.server.jobs.store import JobStore
from fedcore.server.transport.traffic import Traffic, TrafficCounters


def _round(store: JobStore, job_id: str, n: int, sent: int, received: int) -> None:
    row = {"round": n, "bytes_sent": sent, "bytes_received": received}
    store.record_round(
        job_id, n, f"round {n} completed", json.dumps(row), bytes_sent=sent, bytes_received=received
    )


def test_the_store_keeps_a_jobs_bytes_as_the_sum_of_its_rounds_across_a_restart(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job = store.submit(study="s", scientist="a", kind="train", settings={}, rounds=4)
    store.set_state(job.id, "running")
    _round(store, job.id, 1, 100, 40)
    _round(store, job.id, 2, 110, 50)
    store.close()  # a kill: everything was committed
    store = JobStore(tmp_path / "jobs.db")
    store.recover()
    record = store.get(job.id)
    assert record.state == "queued"
    assert (record.bytes_sent, record.bytes_received) == (210, 90)
    # Queued again, not counting yet: status shows what its rounds moved, not zero.
    info = job_info(record)
    assert (info.bytes_sent, info.bytes_received) == (210, 90)
    # Resumed, its counter opens there and goes on.
    counters = TrafficCounters()
    live = counters.open(job.id, Traffic(record.bytes_sent, record.bytes_received))
    counters.count(job.id, sent=5, received=2)
    assert (live.bytes_sent, live.bytes_received) == (215, 92)
    assert counters.open(job.id, Traffic(1, 1)) is live  # opened again: the same counter
    assert (live.bytes_sent, live.bytes_received) == (215, 92)
    _round(store, job.id, 3, 5, 2)
    record = store.get(job.id)
    assert (record.bytes_sent, record.bytes_received) == (215, 92)
    store.close()


def test_a_store_written_before_bytes_were_kept_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
        "study TEXT NOT NULL, scientist TEXT NOT NULL, kind TEXT NOT NULL, settings TEXT NOT "
        "NULL, state TEXT NOT NULL, message TEXT NOT NULL DEFAULT '', rounds_done INTEGER NOT "
        "NULL DEFAULT 0, rounds INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, "
        "stop_requested INTEGER NOT NULL DEFAULT 0, result TEXT NOT NULL DEFAULT '');"
        "INSERT INTO jobs (id, study, scientist, kind, settings, state, rounds, created) "
        "VALUES ('j1', 's', 'a', 'train', '{}', 'running', 3, 0);"
    )
    old.commit()
    old.close()
    store = JobStore(path)
    record = store.get("j1")
    assert (record.bytes_sent, record.bytes_received) == (0, 0)
    _round(store, "j1", 1, 7, 3)
    assert store.get("j1").bytes_sent == 7
    store.close()
