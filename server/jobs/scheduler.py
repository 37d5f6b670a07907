"""Which queued jobs run now: up to ``max_running`` at once, studies served fairly.

The queue is the job store's (ordered by submission; a job interrupted by a restart keeps its
place). Whenever a job is submitted or ends, the scheduler starts queued jobs while fewer than
``max_running`` run: the first queued job of the study with the fewest running jobs, so one
study's long queue does not starve another's. Jobs run as tasks of one task group; a queued
job is only a row, so a long queue costs the coordinator nothing but its rows. Securely
aggregated jobs run together like any others: every secure message names its job, the
transport routes it to that job's round only, and a worker keeps a round per job
(``server/transport/service.py``, ``worker/secagg.py``). A worker takes one training task
at a time unless its owner allows more (``[jobs] max-tasks``, judged per job in
``workers.py``), and never two of one job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Protocol

from .store import JobRecord, JobStore

__all__ = ["RunnableJob", "Scheduler"]

log = logging.getLogger("fedcore.server")


class RunnableJob(Protocol):
    """A training or query job as the scheduler runs it."""

    record: JobRecord

    async def run(self) -> None: ...

    def stop(self) -> None: ...


class Scheduler:
    """Starts queued jobs, at most ``max_running`` at once."""

    def __init__(
        self, store: JobStore, make_job: Callable[[JobRecord], RunnableJob], max_running: int
    ) -> None:
        self.store = store
        self._make_job = make_job
        self.max_running = max_running
        #: The jobs running now, by id.
        self.running: dict[str, RunnableJob] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the queue again (a job was submitted or stopped)."""
        self._wake.set()

    def stop(self, job_id: str) -> None:
        """Stop a job: a running one at its next round boundary, a queued one at once."""
        self.store.request_stop(job_id)
        job = self.running.get(job_id)
        if job is not None:
            job.stop()
            return
        record = self.store.get(job_id)
        if record.state == "queued":
            self.store.set_state(job_id, "stopped", "stopped before it started")
            self.store.log(job_id, "stopped before it started")

    def _next(self) -> list[JobRecord]:
        """The queued jobs to start now, in order."""
        free = self.max_running - len(self.running)
        if free <= 0:
            return []
        per_study = collections.Counter(job.record.study for job in self.running.values())
        chosen: list[JobRecord] = []
        queue = self.store.queued()
        while free > 0 and queue:
            # Fewest running jobs of its study first; submission order breaks ties.
            record = min(queue, key=lambda r: (per_study[r.study], r.seq))
            queue.remove(record)
            chosen.append(record)
            per_study[record.study] += 1
            free -= 1
        return chosen

    async def run(self) -> None:
        """Run queued jobs as they come, until cancelled."""
        async with asyncio.TaskGroup() as group:
            while True:
                self._wake.clear()
                for record in self._next():
                    job = self._make_job(record)
                    self.running[record.id] = job
                    self.store.set_state(record.id, "running", "starting")
                    group.create_task(self._run(job))
                await self._wake.wait()

    async def _run(self, job: RunnableJob) -> None:
        job_id = job.record.id
        try:
            await job.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one job must not end the network's other jobs
            log.exception("job %s failed", job_id)
            self.store.set_state(job_id, "failed", f"internal error: {exc}")
            self.store.log(job_id, f"failed: internal error: {exc}")
        finally:
            self.running.pop(job_id, None)
            self.wake()
