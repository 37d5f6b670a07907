"""``[jobs] approval = "always"``: every job waits for its data owner's decision.

Shipped plans already wait for the owner (:mod:`.plans`, ``[plans] require-approval``). Under
``approval = "always"`` every task of every job does, whatever its model, and every analytics
query: the first task of a job under new terms queues a request in the owner's request queue
(:class:`~fedcore.plans.queue.RequestQueue`, the one ``fed-worker requests`` reads) naming
the job, the data scientist who asked and the study (as the coordinator says), the model or
plan and the terms, and is answered "awaiting approval" (the coordinator's round waits for the
decision, ``--approval-timeout``). An approval covers the job under those terms (``approve
--lr-range``, ``--rounds`` as for plans); evaluation follows the decision on the job's
training; a denial's reason goes back to the coordinator. A query's approval covers that
query, answered once (``--rounds N``: N times): a coordinator that asks it again is refused.
"""

from __future__ import annotations

import logging

from fedcore.errors import AwaitingApproval, TaskRefused
from fedcore.plans.queue import JobOrigin, PlanRequestRecord, QueueFull, RequestQueue, Terms
from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["RULE", "JobApprovals"]

log = logging.getLogger("fedcore.worker")

#: The rule a task or query awaiting, or denied, the owner's decision on its job breaks.
RULE = "jobs.approval"


class JobApprovals:
    """The owner's decisions on jobs, in ``queue``; ``coordinator``: whom requests count
    against (the queue's per-coordinator daily cap)."""

    def __init__(self, queue: RequestQueue, coordinator: str = "") -> None:
        self.queue = queue
        self.coordinator = coordinator

    def check_task(self, task: pb.Task) -> None:
        """Admit ``task`` only under an approval of its job and terms (call off the loop).

        Raises:
            AwaitingApproval: queued, or still undecided.
            TaskRefused: denied, its approved rounds all run, or the queue is full.
        """
        record = self._decision(JobOrigin.of_task(task), Terms.of(task), task.round)
        if task.kind == pb.TASK_KIND_FIT:
            if record.rounds_left == 0:
                raise TaskRefused(
                    RULE,
                    f"the data owner's approval {record.id[:16]} covered {record.rounds} "
                    f"round(s) of this job, all run; it must be approved again (fed-worker "
                    f"requests approve {record.id[:16]} --rounds N)",
                    by="policy",
                )
            self.queue.count_round(record)

    def check_query(self, task: pb.QueryTask) -> None:
        """Admit analytics query ``task`` only under an approval not used up (call off the
        loop).

        Raises:
            AwaitingApproval: queued, or still undecided.
            TaskRefused: denied, already answered, or the queue is full.
        """
        self._query_approval(task)

    def use_query(self, task: pb.QueryTask) -> None:
        """Check ``task``'s approval again and use it up: called just before the answer's
        charge, so a round abandoned before any answer left (another silo still awaiting its
        owner) keeps the approval for the next ask, and a coordinator never has one approval
        answered twice."""
        self.queue.count_round(self._query_approval(task))

    def _query_approval(self, task: pb.QueryTask) -> PlanRequestRecord:
        record = self._decision(JobOrigin.of_query(task), Terms("query", secagg=True), 0)
        if record.used >= (record.rounds or 1):
            raise TaskRefused(
                RULE,
                f"the data owner's approval {record.id[:16]} of this query covered "
                f"{record.rounds or 1} answer(s), all given; submit it again for a new decision",
                by="policy",
            )
        return record

    def _decision(self, origin: JobOrigin, terms: Terms, round_number: int) -> PlanRequestRecord:
        """The approved request for ``origin`` under ``terms``; raises while it is not."""
        digest = origin.digest()
        record = self.queue.lookup(digest, terms)
        if record is None:
            try:
                record = self.queue.submit_job(
                    origin, terms, round=round_number, coordinator=self.coordinator
                )
            except QueueFull as exc:
                raise TaskRefused("jobs.queue", str(exc), by="policy") from None
            log.warning(
                "%s awaits the data owner's approval: fed-worker requests --queue %s show %s",
                origin.title(),
                self.queue.root,
                record.id[:16],
            )
        if record.status == "approved":
            return record
        what = origin.title()
        if record.status == "denied":
            raise TaskRefused(
                RULE,
                f"{what} was denied by the data owner"
                + (f": {record.reason}" if record.reason else "")
                + f" (request {record.id[:16]})",
                by="policy",
            )
        raise AwaitingApproval(
            RULE,
            f"awaiting approval: {what} is in the data owner's request queue as request "
            f"{record.id[:16]} (fed-worker requests approve)",
            by="policy",
        )
