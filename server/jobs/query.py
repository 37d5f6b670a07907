"""An analytics query as a job: the same frontend as ``fed-query``, queued and logged."""

from __future__ import annotations

import json
import logging

from google.protobuf.json_format import MessageToDict

from fedcore.errors import ConfigError, QueryRefusedError

from ..analytics.frontend import AnalyticsFrontend
from ..analytics.service import answer_to_proto
from .job import JobEnvironment
from .store import JobRecord

__all__ = ["QueryJob"]

log = logging.getLogger("fedcore.server")


class QueryJob:
    """One query; ``await job.run()`` answers it (or records why not)."""

    def __init__(
        self, record: JobRecord, env: JobEnvironment, frontend: AnalyticsFrontend | None
    ) -> None:
        self.record = record
        self.env = env
        self.frontend = frontend

    def stop(self) -> None:
        """A query is one secure round: it is not cut in the middle."""

    async def run(self) -> None:
        job_id, store, settings = self.record.id, self.env.store, self.record.settings
        if self.frontend is None:
            self._end("failed", "this network serves no analytics", None)
            return
        store.set_state(job_id, "running", "asking the silos")
        try:
            answer = await self.frontend.query(
                str(settings["query"]),
                epsilon=float(settings["epsilon"]),
                delta=float(settings.get("delta", 0.0)),
                tags=tuple(settings.get("tags", ())),
            )
        except (QueryRefusedError, ConfigError) as exc:
            self._end("failed", f"not answered: {exc}", None)
            return
        reply = MessageToDict(answer_to_proto(answer), preserving_proto_field_name=True)
        store.set_result(job_id, json.dumps(reply))
        spent = {s.silo: s.epsilon for s in answer.spent}
        self._end("completed", f"answered: {answer.statistic}", spent)

    def _end(self, state: str, message: str, spent: dict[str, float] | None) -> None:
        job_id = self.record.id
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
