"""The ``fedcore.v1.Analytics`` gRPC service: data scientists, authenticated by their token.

Every call must carry a data scientist's token (``x-fedcore-token`` metadata), checked
against the scientists' enrollment file (``fed-server --scientists``, written by
``fed-certs add-scientist``; re-read when it changes). Worker tokens live in another file
and prove nothing here. Errors map to status codes: a bad query is INVALID_ARGUMENT, a
refusal (with each silo's rule and reason) FAILED_PRECONDITION; both count toward the
scientist's refusal limit (:mod:`.refusals`), past which their queries are RESOURCE_EXHAUSTED
without reaching a silo.
"""

from __future__ import annotations

import logging
import math

import grpc

from fedcore.analytics.answer import Answer
from fedcore.enrollment import Enrollment
from fedcore.errors import ConfigError, QueryRefusedError
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.v1 import fedcore_pb2_grpc

from ..transport.scientists import Context, abort, identify_scientist
from .frontend import AnalyticsFrontend
from .refusals import RefusalLimiter
from .rounds import QueryOrigin

__all__ = ["AnalyticsService", "answer_to_proto"]

log = logging.getLogger("fedcore.server")


def answer_to_proto(answer: Answer) -> pb.QueryReply:
    return pb.QueryReply(
        query=answer.query,
        statistic=answer.statistic,
        cells=[
            pb.AnswerCell(
                group=c.group,
                value=c.value,
                std_error=c.std_error,
                values=c.values,
                std_errors=c.std_errors,
                count=c.count,
            )
            for c in answer.cells
        ],
        bins=answer.bins,
        quantiles=answer.quantiles,
        spent=[
            pb.SiloSpend(
                silo=s.silo,
                epsilon=s.epsilon,
                delta=s.delta,
                budget_left=s.budget_left,
                budget_delta=s.budget_delta,
            )
            for s in answer.spent
        ],
        noise_multiplier=answer.noise_multiplier,
        noise_std=list(answer.noise_std.values()),
        noise_std_names=list(answer.noise_std),
        exact_test_mode=answer.exact_test_mode,
    )


class AnalyticsService(fedcore_pb2_grpc.AnalyticsServicer):
    """Datasets, Mock and Query for enrolled data scientists."""

    def __init__(
        self, frontend: AnalyticsFrontend, scientists: Enrollment, refusals: RefusalLimiter
    ) -> None:
        self.frontend = frontend
        self.scientists = scientists
        self.refusals = refusals

    def register(self, server: grpc.aio.Server) -> None:
        fedcore_pb2_grpc.add_AnalyticsServicer_to_server(self, server)

    async def _who(self, context: Context) -> str:
        name, _ = await identify_scientist(
            context, self.scientists, "`fed-certs add-scientist` and pass it with --token-file"
        )
        return name

    async def Datasets(self, request: pb.DatasetsRequest, context: Context) -> pb.DatasetsReply:
        await self._who(context)
        try:
            entries = self.frontend.silos(tuple(request.tags))
        except ConfigError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        reply = pb.DatasetsReply()
        for entry in entries:
            info = entry.dataset.with_mock_csv("").to_proto()
            reply.datasets.append(
                pb.SiloDataset(silo=entry.silo, dataset=info, has_mock=bool(entry.dataset.mock_csv))
            )
        return reply

    async def Mock(self, request: pb.MockRequest, context: Context) -> pb.MockReply:
        who = await self._who(context)
        try:
            csv = self.frontend.mock(request.silo)
        except QueryRefusedError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("data scientist %r fetched the mock of %r", who, request.silo)
        return pb.MockReply(silo=request.silo, csv=csv)

    async def Query(self, request: pb.QueryRequest, context: Context) -> pb.QueryReply:
        who = await self._who(context)
        wait = self.refusals.blocked_for(who)
        if wait is not None:
            log.warning("query of %r not forwarded: over the refusal limit", who)
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.refusals.limit} of your queries were refused within "
                f"{self.refusals.window:g} s (--analytics-refusal-limit); no silo was asked. "
                f"Check the datasets' schemas and the silos' rules (docs/analytics.md) and ask "
                f"again in {math.ceil(wait)} s",
            )
        log.info("data scientist %r asks %r at epsilon %g", who, request.query, request.epsilon)
        try:
            answer = await self.frontend.query(
                request.query,
                epsilon=request.epsilon,
                delta=request.delta,
                tags=tuple(request.tags),
                origin=QueryOrigin(scientist=who),
            )
        except QueryRefusedError as exc:
            log.warning("query of %r not answered: %s", who, exc)
            self.refusals.record(who)
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ConfigError as exc:  # QueryError, a bad epsilon or tag
            self.refusals.record(who)
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return answer_to_proto(answer)
