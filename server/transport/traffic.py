"""Bytes on the workers' streams, in total and per job.

Every message on a worker's stream belongs to one job or to none (the hello, heartbeats,
the welcome). The coordinator knows which without trusting the worker: a Task names its job,
and its weights follow it on that stream; the worker's result or error names the task (its
job is the task's, as the coordinator gave it), and the upload's chunks follow the result
(a worker holding tasks of several jobs sends one upload at a time); a secure-aggregation
message names its job, believed only for jobs the worker was given tasks of; an
analytics message names its query's job both ways (``AnalyticsCoordinatorMessage.job_id``),
and the worker's are believed only for jobs it was asked a query of on this stream. :class:`StreamJobs` keeps that per stream;
:class:`TrafficCounters` adds each message's size to the totals and to its job, when the job
is *open* (:meth:`TrafficCounters.open`, from its start to its end): a job id nobody runs
(a stale round, a hostile worker) counts in the totals only, and ended jobs leave nothing
behind. A job resumed after a restart opens its counter at what its recorded rounds moved
before (:mod:`fedcore.server.jobs.store`), so its bytes go on across restarts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["StreamJobs", "Traffic", "TrafficCounters"]

#: Query jobs a stream remembers (a worker answers at most a few queries at once).
_RECENT_QUERIES = 32
#: Unanswered tasks a stream remembers (a worker holds at most a few at once).
_OPEN_TASKS = 64


@dataclass
class Traffic:
    """Bytes sent to and received from workers (messages as serialized on the wire)."""

    bytes_sent: int = 0
    bytes_received: int = 0

    def to_json(self) -> dict[str, int]:
        return {"sent": self.bytes_sent, "received": self.bytes_received}


@dataclass
class TrafficCounters(Traffic):
    """Bytes through all streams since start, and per open job."""

    jobs: dict[str, Traffic] = field(default_factory=dict)

    def count(self, job: str, *, sent: int = 0, received: int = 0) -> None:
        """Add one message's bytes to the totals and to ``job`` if it is open."""
        self.bytes_sent += sent
        self.bytes_received += received
        traffic = self.jobs.get(job) if job else None
        if traffic is not None:
            traffic.bytes_sent += sent
            traffic.bytes_received += received

    def open(self, job: str, start: Traffic | None = None) -> Traffic:
        """Start counting ``job``'s bytes from ``start`` (a resumed job's so far; default
        none); the live counter. Opened again, the same counter, ``start`` ignored."""
        traffic = self.jobs.get(job)
        if traffic is None:
            traffic = self.jobs[job] = Traffic()
            if start is not None:
                traffic.bytes_sent, traffic.bytes_received = start.bytes_sent, start.bytes_received
        return traffic

    def close(self, job: str) -> Traffic:
        """Stop counting ``job``; what it counted."""
        return self.jobs.pop(job, None) or Traffic()

    def of_job(self, job: str) -> Traffic | None:
        """The live counter of open job ``job`` (None: not open)."""
        return self.jobs.get(job)


class StreamJobs:
    """Which job each message of one worker's stream belongs to ("" for none), and which
    jobs' tasks the worker holds."""

    def __init__(self) -> None:
        #: The job of the last Task sent: its weights.
        self.task = ""
        #: The jobs of the tasks sent and not answered yet, by task id (oldest first).
        self.open_tasks: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: The job of the upload under way: its chunks.
        self.upload = ""
        #: The jobs of the last queries sent (their QueryTask), newest last: the only jobs
        #: whose queries may hear from this worker (a few at once; old ones are forgotten).
        self.queries: collections.deque[str] = collections.deque(maxlen=_RECENT_QUERIES)
        #: Jobs this stream was given tasks of, until their JobEnd: the only jobs whose
        #: secure rounds may hear from this worker.
        self.given: set[str] = set()

    def outgoing(self, message: pb.CoordinatorMessage) -> str:
        kind = message.WhichOneof("body")
        if kind == "task":
            self.task = message.task.job_id
            self.given.add(self.task)
            self.open_tasks[message.task.task_id] = self.task
            while len(self.open_tasks) > _OPEN_TASKS:
                self.open_tasks.popitem(last=False)
            return self.task
        if kind == "analytics":
            job = message.analytics.job_id
            if message.analytics.WhichOneof("body") == "task" and job not in self.queries:
                self.queries.append(job)
            return job
        if kind == "secagg":
            return message.secagg.job_id
        if kind == "chunk":
            return self.task
        if kind == "job_end":
            self.given.discard(message.job_end.job_id)
            return message.job_end.job_id
        return ""

    def payload(self) -> str:
        """Chunks follow the Task they belong to (the outbox keeps them together)."""
        return self.task

    def incoming(self, message: pb.WorkerMessage | None) -> str:
        """``None``: a raw payload chunk (an upload)."""
        if message is None:
            return self.upload
        kind = message.WhichOneof("body")
        if kind == "result":
            self.upload = self.open_tasks.pop(message.result.task_id, "")
            return self.upload
        if kind == "error":
            return self.open_tasks.pop(message.error.task_id, "")
        if kind == "chunk":
            return self.upload
        if kind == "secagg":
            job = message.secagg.job_id
            return job if job in self.given else ""
        if kind == "analytics":
            return self.query_job(message.analytics) or ""
        return ""

    def query_job(self, message: pb.AnalyticsWorkerMessage) -> str | None:
        """The job of a worker's analytics message, if it was asked a query of that job."""
        return message.job_id if message.job_id in self.queries else None
