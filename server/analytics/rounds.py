"""One query's round over the workers' streams: admission, then the secure round of
:class:`~fedcore.secagg.driver.RoundDriver` (the one training rounds run).

::

    QueryTask ──▶ every silo: QueryAccept + keys (or a QueryRefusal: the query fails, nothing
                  is unmasked, the others abandon their round)
    peers ──▶ shares ──▶ masked noisy sums ──▶ unmasking ──▶ the noisy totals

The round's threshold is the number of silos: if any silo is missing at any phase, the round
aborts and nothing is revealed. The coordinator only ever holds masked vectors and the total.
With ``signed`` (``fed-server --secagg-signed``) the round names its silos: they sign their
keys and check each other's view of the round before unmasking, as in training.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcore.analytics.encoding import masked_words, round_setup
from fedcore.analytics.layout import Layout
from fedcore.errors import ProtocolError, QueryRefusedError, SecAggError
from fedcore.secagg import wire
from fedcore.secagg.driver import Phase, RoundDriver
from fedcore.secagg.server import SecAggServer
from fedcore.v1 import fedcore_pb2 as pb

from ..state.registry import SessionState, WorkerSession

__all__ = ["QueryAwaitingApproval", "QueryOrigin", "QueryOutcome", "QueryRound"]

log = logging.getLogger("fedcore.server")


class QueryAwaitingApproval(QueryRefusedError):
    """Every silo that refused waits for its data owner's decision on the query's job
    (``[jobs] approval = "always"``): asked again once they approve, the query is answered."""

    def __init__(self, message: str, *, silos: list[str], asked: int) -> None:
        super().__init__(message)
        #: The silos whose owners have not decided, of ``asked``.
        self.silos = silos
        self.asked = asked


@dataclass(frozen=True)
class QueryOrigin:
    """The job a query belongs to and who asked, named to the silos (empty: ``fed-query``)."""

    job_id: str = ""
    scientist: str = ""
    study: str = ""


@dataclass(frozen=True)
class QueryOutcome:
    """The noisy totals (in the sums' units) and what each silo said when it accepted."""

    totals: npt.NDArray[np.float64]
    accepts: dict[str, pb.QueryAccept]


class QueryRound:
    """Drives one query across ``sessions`` (indexes 1..n in order)."""

    def __init__(
        self,
        query_id: str,
        layout: Layout,
        *,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sessions: Sequence[WorkerSession],
        phase_timeout: float,
        signed: bool = False,
        origin: QueryOrigin | None = None,
    ) -> None:
        self.query_id = query_id
        self.origin = origin or QueryOrigin()
        self.layout = layout
        self.epsilon = epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.sessions = {i + 1: s for i, s in enumerate(sessions)}
        self._index = {s.worker_id: i for i, s in self.sessions.items()}
        self.phase_timeout = phase_timeout
        self.words = masked_words(layout.words)
        names = [s.name for s in sessions]
        self.setup = round_setup(
            query_id, len(sessions), phase_timeout, members=names if signed else ()
        )
        self.server = SecAggServer(self.setup, len(sessions), self.words)
        self.driver = RoundDriver(
            self.server, self, label=f"query {query_id}", names=names, needed=len(sessions)
        )
        self.accepts: dict[int, pb.QueryAccept] = {}
        self.refusals: dict[int, str] = {}
        #: Silos (indexes) whose refusal only awaits their owner's decision.
        self.awaiting: set[int] = set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ wire in

    def on_message(self, session: WorkerSession, message: pb.AnalyticsWorkerMessage) -> None:
        """Route one message of a participant (raises ProtocolError on a malformed one)."""
        index = self._index.get(session.worker_id)
        kind = message.WhichOneof("body")
        if index is None or kind is None:
            return
        try:
            if kind == "accept":
                self._accept(index, message.accept)
            elif kind == "refusal":
                r = message.refusal
                if r.query_id == self.query_id:
                    self.refusals[index] = f"[{r.rule}] {r.reason}"[:2000]
                    if r.awaiting_approval:
                        self.awaiting.add(index)
            elif kind == "masked":
                self._masked(index, message.masked)
            else:
                self._secagg(index, message.secagg)
        except SecAggError as exc:
            raise ProtocolError(f"analytics secure aggregation: {exc}") from None
        self._changed.set()

    def _accept(self, index: int, accept: pb.QueryAccept) -> None:
        if accept.query_id != self.query_id:
            return
        if accept.vector_words != self.words:
            self.refusals[index] = (
                f"announced {accept.vector_words} words, the query needs {self.words}"
            )
        elif not math.isclose(accept.noise_multiplier, self.noise_multiplier, rel_tol=1e-3):
            self.refusals[index] = (
                f"calibrated noise multiplier {accept.noise_multiplier:.6g}, the coordinator "
                f"{self.noise_multiplier:.6g}; run matching fedcore versions"
            )
        else:
            self.accepts[index] = accept

    def _masked(self, index: int, masked: pb.QueryMasked) -> None:
        if masked.query_id != self.query_id:
            return
        if len(masked.masked) != 8 * self.words:
            raise ProtocolError(
                f"a masked query answer of {len(masked.masked)} bytes, expected {8 * self.words}"
            )
        vector = np.frombuffer(masked.masked, dtype="<u8").astype(np.uint64)
        self.driver.add_masked(index, vector)

    def _secagg(self, index: int, message: pb.SecAggWorkerMessage) -> None:
        reason = self.driver.receive(index, message)
        if reason is not None:
            self.refusals[index] = f"left the secure round: {reason}"[:2000]

    # ------------------------------------------------------------------ phases

    def _send(self, index: int, **fields: object) -> None:
        message = pb.AnalyticsCoordinatorMessage(job_id=self.origin.job_id, **fields)  # type: ignore[arg-type]
        self.sessions[index].send_urgent(pb.CoordinatorMessage(analytics=message))

    def send(self, index: int, message: pb.SecAggCoordinatorMessage) -> None:
        """The driver's messages, inside the analytics envelope."""
        self._send(index, secagg=message)

    def _failed(self) -> str | None:
        if self.refusals and set(self.refusals) <= self.awaiting:
            # Only owners' pending decisions so far: hear every silo, so that the job shows
            # whom it awaits (a real refusal among the rest still ends the query now).
            answered = set(self.refusals) | set(self.accepts)
            if len(answered) < len(self.sessions):
                return None
            names = [self.sessions[i].name for i in sorted(self.awaiting)]
            raise QueryAwaitingApproval(
                f"the query awaits approval at {len(names)} of {len(self.sessions)} silos "
                f"({', '.join(names)})",
                silos=names,
                asked=len(self.sessions),
            )
        if self.refusals:
            return "; ".join(
                f"silo {self.sessions[i].name!r}: {why}" for i, why in sorted(self.refusals.items())
            )
        gone = [s.name for s in self.sessions.values() if s.state is SessionState.CLOSED]
        if gone:
            return f"silo(s) {', '.join(gone)} disconnected"
        return None

    async def until(
        self, phase: Phase, done: Callable[[int], bool], members: Sequence[int]
    ) -> None:
        """Every silo (not only ``members``) within the phase timeout, or the query fails."""
        if phase is Phase.KEYS:
            await self._until(lambda i: i in self.accepts and done(i), "acceptance")
        else:
            await self._until(done, phase.value)

    async def _until(self, done: Callable[[int], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.phase_timeout
        while True:
            failure = self._failed()
            if failure is not None:
                raise QueryRefusedError(f"the query was not answered: {failure}")
            if all(done(i) for i in self.sessions):
                return
            left = deadline - loop.time()
            if left <= 0:
                late = [s.name for i, s in self.sessions.items() if not done(i)]
                raise QueryRefusedError(
                    f"the query was not answered: no {what} from {', '.join(late)} within "
                    f"{self.phase_timeout:g} s"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue

    async def run(self, query_text: str) -> QueryOutcome:
        """Ask every silo, run the secure round, return the noisy totals.

        Raises:
            QueryRefusedError: a silo refused (with its rule and reason), left, or was late.
        """
        try:
            return await self._run(query_text)
        except (QueryRefusedError, SecAggError) as exc:
            self.driver.abort(sorted(self.sessions), str(exc))
            if isinstance(exc, SecAggError):
                raise QueryRefusedError(f"the query's secure round failed: {exc}") from None
            raise

    async def _run(self, query_text: str) -> QueryOutcome:
        task = pb.QueryTask(
            query_id=self.query_id,
            query=query_text,
            epsilon=self.epsilon,
            delta=self.delta,
            silos=len(self.sessions),
            secagg=wire.setup_to_proto(self.setup),
            job_id=self.origin.job_id,
            scientist=self.origin.scientist,
            study=self.origin.study,
        )
        for i in self.sessions:
            self._send(i, task=task)
        result = await self.driver.run(sorted(self.sessions))
        if result.num_examples != len(self.sessions):
            raise QueryRefusedError(
                f"the sum holds {result.num_examples} silo(s), {len(self.sessions)} expected"
            )
        totals = result.weighted_sum * self.layout.scale_vector()
        log.info(
            "query %s: securely summed the answers of %d silo(s)", self.query_id, len(self.sessions)
        )
        return QueryOutcome(
            totals, {self.sessions[i].name: a for i, a in sorted(self.accepts.items())}
        )
