"""An analytics query as a job: the same frontend as ``fed-query``, queued and logged.

The silos are told the query's job, its data scientist and study. Silos whose owners approve
every job (``[jobs] approval = "always"``) answer "awaiting approval" until their owner
decides: the job then shows ``awaiting-approval`` ("awaiting approval at 1 of 2 silos") and
asks again, backing off, until every owner approved (it is answered), one denied (the job is
``denied`` with the owner's reason) or ``--approval-timeout`` passed (``denied`` too). Nothing
is answered, nor charged, while any silo waits: the query's threshold is every silo.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from google.protobuf.json_format import MessageToDict

from fedcore.analytics.answer import Answer
from fedcore.errors import ConfigError, QueryRefusedError

from ..analytics.frontend import AnalyticsFrontend
from ..analytics.rounds import QueryAwaitingApproval, QueryOrigin
from ..analytics.service import answer_to_proto
from .approval import ApprovalWatch
from .job import JobEnvironment
from .store import JobRecord

__all__ = ["QueryJob"]

log = logging.getLogger("fedcore.server")

#: Seconds before asking silos awaiting their owners again, doubling up to the most.
_FIRST_BACKOFF = 0.5
_MOST_BACKOFF = 10.0


class QueryJob:
    """One query; ``await job.run()`` answers it (or records why not)."""

    def __init__(
        self, record: JobRecord, env: JobEnvironment, frontend: AnalyticsFrontend | None
    ) -> None:
        self.record = record
        self.env = env
        self.frontend = frontend
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """A query is one secure round: it is not cut in the middle (a wait for owners is)."""
        self._stopped.set()

    async def run(self) -> None:
        job_id, store = self.record.id, self.env.store
        self.env.service.counters.open(job_id)  # its messages' bytes, from now to its end
        if self.frontend is None:
            self._end("failed", "this network serves no analytics", None)
            return
        store.set_state(job_id, "running", "asking the silos")
        try:
            answer = await self._ask(self.frontend)
        except (QueryRefusedError, ConfigError) as exc:
            denied = "[jobs.approval]" in str(exc) and "denied by the data owner" in str(exc)
            self._end("denied" if denied else "failed", f"not answered: {exc}", None)
            return
        if answer is None:
            return  # stopped, or no decision in time: already recorded
        reply = MessageToDict(answer_to_proto(answer), preserving_proto_field_name=True)
        spent = {s.silo: s.epsilon for s in answer.spent}
        self._end("completed", f"answered: {answer.statistic}", spent, reply)

    async def _ask(self, frontend: AnalyticsFrontend) -> Answer | None:
        """The answer, asking again while owners decide; None once it ended otherwise."""
        settings = self.record.settings
        timeout = self.env.config.limits.approval_timeout
        watch = ApprovalWatch(timeout, self._note)
        deadline = time.monotonic() + timeout
        backoff = _FIRST_BACKOFF
        while True:
            try:
                answer = await frontend.query(
                    str(settings["query"]),
                    epsilon=float(settings["epsilon"]),
                    delta=float(settings.get("delta", 0.0)),
                    tags=tuple(settings.get("tags", ())),
                    origin=QueryOrigin(self.record.id, self.record.scientist, self.record.study),
                )
            except QueryAwaitingApproval as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._end(
                        "denied",
                        f"no decision within the approval timeout ({timeout:g} s) at silo(s) "
                        + ", ".join(exc.silos),
                        None,
                    )
                    return None
                watch.awaiting(exc.silos, exc.asked)
                try:  # a stop ends the wait at once
                    await asyncio.wait_for(self._stopped.wait(), min(backoff, left))
                except TimeoutError:
                    backoff = min(backoff * 2, _MOST_BACKOFF)
                    continue
                self._end("stopped", "stopped while awaiting approval", None)
                return None
            watch.awaiting([], 0)
            return answer

    def _note(self, text: str, state: str) -> None:
        self.env.store.set_state(self.record.id, state, text)
        self.env.store.log(self.record.id, text)

    def _end(
        self,
        state: str,
        message: str,
        spent: dict[str, float] | None,
        reply: dict[str, object] | None = None,
    ) -> None:
        """Record the end: the answer (``reply``) and the job's bytes, its state, the audit."""
        job_id = self.record.id
        traffic = self.env.service.counters.close(job_id)
        self.env.store.set_result(job_id, json.dumps({**(reply or {}), "bytes": traffic.to_json()}))
        self.env.store.set_state(job_id, state, message)
        self.env.store.log(job_id, f"{state}: {message}")
        self.env.audit.append(
            state,
            job=job_id,
            kind="query",
            study=self.record.study,
            scientist=self.record.scientist,
            reason=message,
            epsilon=spent,
        )
        log.info("query job %s %s: %s", job_id, state, message)
