"""What the Analytics service does, without gRPC: search datasets, hand out mocks, answer
queries over the connected silos that serve tables: ``fed-query``'s one at a time, a standing
network's query jobs at once (each round gets the messages naming its job)."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from dataclasses import dataclass

import numpy as np

from fedcore.analytics.answer import Answer, SiloSpend, cells_from_totals
from fedcore.analytics.layout import Layout, plan_layout
from fedcore.analytics.mechanism import answer_noise_std, noise_multiplier_for
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import DatasetMetadata, FeatureInfo, normalize_tag
from fedcore.errors import QueryRefusedError
from fedcore.protocol import ANALYTICS_CAPABILITY
from fedcore.v1 import fedcore_pb2 as pb

from ..state.analytics import AnalyticsSettings
from ..state.registry import SessionState, WorkerRegistry, WorkerSession
from .rounds import QueryOrigin, QueryRound

__all__ = ["MIN_SILOS", "AnalyticsFrontend", "SiloEntry", "answer_of"]

log = logging.getLogger("fedcore.server")

#: Silos a query needs: secure aggregation's threshold is their number, and must be 2 or more.
MIN_SILOS = 2


@dataclass(frozen=True)
class SiloEntry:
    """A connected silo's dataset, as a data scientist may see it."""

    silo: str
    dataset: DatasetMetadata


class AnalyticsFrontend:
    """Datasets, mocks and queries over the registry's silos."""

    def __init__(self, settings: AnalyticsSettings, registry: WorkerRegistry) -> None:
        self.settings = settings
        self.registry = registry
        # fed-query's queries (no job) run one at a time; each job runs its own.
        self._lock = asyncio.Lock()
        #: The running queries' rounds, by job id ("": fed-query's).
        self._rounds: dict[str, QueryRound] = {}

    def route(self, session: WorkerSession, message: pb.AnalyticsWorkerMessage) -> None:
        """A worker's analytics message: to the running query of the job it names (dropped
        when there is none; the round ignores a silo it did not ask)."""
        current = self._rounds.get(message.job_id)
        if current is not None:
            current.on_message(session, message)

    def silos(self, tags: tuple[str, ...] = ()) -> list[SiloEntry]:
        """Connected silos serving a table whose dataset carries every tag of ``tags``."""
        wanted = tuple(normalize_tag(t) for t in tags)
        out = []
        for session in self.registry.sessions():
            dataset = session.dataset
            if (
                session.state is SessionState.CLOSED
                or dataset is None
                or ANALYTICS_CAPABILITY not in session.capabilities
                or not dataset.has_tags(wanted)
            ):
                continue
            out.append(SiloEntry(session.name, dataset))
        return sorted(out, key=lambda e: e.silo)

    def mock(self, silo: str) -> str:
        """The mock rows (CSV) silo ``silo`` attached; never its data.

        Raises:
            QueryRefusedError: no such silo, or it attached no mock.
        """
        entry = next((e for e in self.silos() if e.silo == silo), None)
        if entry is None:
            raise QueryRefusedError(f"no connected silo {silo!r} serves a table")
        if not entry.dataset.mock_csv:
            raise QueryRefusedError(f"silo {silo!r} attached no mock data to its table")
        return entry.dataset.mock_csv

    def _schema(self, entries: list[SiloEntry]) -> dict[str, FeatureInfo]:
        """The silos' common public schema; they must declare the same columns, bounds and
        categories, or the totals would mix incompatible sums."""

        def public(features: tuple[FeatureInfo, ...]) -> list[tuple[object, ...]]:
            return [(f.name, f.dtype, f.bounds, f.categories) for f in features]

        first = entries[0].dataset.features
        for entry in entries[1:]:
            if public(entry.dataset.features) != public(first):
                raise QueryRefusedError(
                    f"silos {entries[0].silo!r} and {entry.silo!r} declare different columns, "
                    "bounds or categories; query them by a tag only one schema carries"
                )
        return {f.name: f for f in first}

    async def query(
        self,
        text: str,
        *,
        epsilon: float,
        delta: float = 0.0,
        tags: tuple[str, ...] = (),
        origin: QueryOrigin | None = None,
    ) -> Answer:
        """Answer ``text`` over every silo tagged ``tags`` (``origin``: its job and who asked,
        as the silos are told).

        Raises:
            QueryError: the query does not parse or fit the schema.
            QueryRefusedError: no silos, different schemas, or a silo refused or failed
                (:class:`~.rounds.QueryAwaitingApproval`: owners have not decided yet).
        """
        origin = origin or QueryOrigin()
        if origin.job_id:
            return await self._answer(text, epsilon, delta, tags, origin)
        async with self._lock:
            return await self._answer(text, epsilon, delta, tags, origin)

    async def _answer(
        self,
        text: str,
        epsilon: float,
        delta: float,
        tags: tuple[str, ...],
        origin: QueryOrigin,
    ) -> Answer:
        if origin.job_id in self._rounds:
            raise QueryRefusedError(f"job {origin.job_id} is already asking a query")
        query = parse_query(text)
        delta = delta or self.settings.default_delta
        z = noise_multiplier_for(epsilon, delta)
        entries = self.silos(tags)
        hint = f" tagged {' '.join('#' + t for t in tags)}" if tags else ""
        if not entries:
            raise QueryRefusedError(f"no connected silo{hint} serves a table")
        if len(entries) < MIN_SILOS:
            # Secure aggregation hides a silo's sums only among others' (its threshold
            # is the number of silos, at least 2): one silo's answer would be its own.
            raise QueryRefusedError(
                f"a query needs at least {MIN_SILOS} silos; only {entries[0].silo!r}"
                f"{hint} serves a table (connect more silos, or widen --tag)"
            )
        layout = plan_layout(query, self._schema(entries))
        sessions = [s for e in entries if (s := self.registry.by_name(e.silo)) is not None]
        query_id = uuid.uuid4().hex
        round_ = QueryRound(
            query_id,
            layout,
            epsilon=epsilon,
            delta=delta,
            noise_multiplier=z,
            sessions=sessions,
            phase_timeout=self.settings.phase_timeout,
            signed=self.settings.signed,
            origin=origin,
        )
        log.info(
            "query %s: %r at epsilon %g over %d silo(s)",
            query_id,
            query.text(),
            epsilon,
            len(sessions),
        )
        self._rounds[origin.job_id] = round_
        try:
            outcome = await round_.run(query.text())
        finally:
            del self._rounds[origin.job_id]
        return answer_of(layout, outcome.totals, outcome.accepts, z, delta)


def answer_of(
    layout: Layout,
    totals: np.ndarray,
    accepts: dict[str, pb.QueryAccept],
    z: float,
    delta: float,
) -> Answer:
    """The scientist's answer from a round's unmasked ``totals`` and the silos' acceptances;
    its error bars are the noise the silos say they added."""
    exact = any(a.exact_test_mode for a in accepts.values())
    bad = [name for name, a in accepts.items() if not 0 <= a.noise_variance < math.inf]
    if bad:
        raise QueryRefusedError(f"silo(s) {', '.join(bad)} reported no valid noise variance")
    # The noise the silos say they added (each sized from its own policy), not an assumed
    # share: silos that trust fewer others add more.
    std = answer_noise_std(layout, [a.noise_variance for a in accepts.values()])
    per_sum = dict(zip(layout.sums, std[: len(layout.sums)].tolist(), strict=True))
    if layout.query.statistic in ("histogram", "quantiles"):
        per_sum = {"bin": float(std[0])}
    return Answer(
        query=layout.query.text(),
        statistic=layout.query.statistic,
        cells=cells_from_totals(layout, totals, std),
        spent=tuple(
            SiloSpend(name, a.epsilon, a.delta, a.budget_left, a.budget_delta)
            for name, a in accepts.items()
        ),
        noise_multiplier=z,
        noise_std=per_sum,
        bins=layout.edges if layout.query.statistic == "histogram" else (),
        quantiles=layout.query.quantiles,
        exact_test_mode=exact,
    )
