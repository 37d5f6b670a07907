"""Federated analytics on the worker: answer queries over a local table, through the gate.

A :class:`QueryResponder` registers its check with the worker's :class:`~.gate.Gate`; each
``QueryTask`` then goes::

    admitted by the gate (parse, columns, epsilon, delta, network, budget) ─▶ QueryAccept + keys
    secure round: peers ─▶ shares ─▶ (charge the ledger, add the noise share, mask) ─▶ QueryMasked
    unmasking request ─▶ unmasking shares

or is refused with the rule and the reason (``QueryRefusal``). The secure round is the
worker's one client (:class:`~fedcore.secagg.participant.Participant`, as for training);
with a signing key it answers only signed rounds, recorded in its participation record
(docs/secure-aggregation.md). The query text is parsed
here, by this worker's own parser, against its own metadata; nothing named in the task is
executed, and no row can be asked for: the only thing that leaves is a masked vector of
noisy sums whose length depends on the query and the public schema alone.

No refusal reads the table: the gate's check sees the query, the public schema, this
silo's policy and its ledger (whose charges depend on the queries asked, not on the rows),
so a refusal is the same whatever the data, and asking again teaches nothing (issue 22).
The local sums are computed only once the query is admitted, and leave only with noise.

The noise can be turned off only by the worker's local operator, for tests, by setting
:data:`EXACT_ENV` in the worker's environment; the worker then logs a warning and every
answer is flagged ``exact_test_mode``. No task can ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from fedcore.analytics.encoding import FIXED_POINT, MAX_WORDS, masked_words, query_job
from fedcore.analytics.layout import Layout, plan_layout
from fedcore.analytics.local import local_sums
from fedcore.analytics.mechanism import (
    charge_for,
    epsilon_for,
    noise_multiplier_for,
    noisy_share,
    share_variance,
)
from fedcore.analytics.query import QueryError, parse_query
from fedcore.analytics.rules import check_cost, check_query
from fedcore.data.metadata import DatasetMetadata
from fedcore.data.table import Table
from fedcore.errors import AwaitingApproval, ConfigError, ProtocolError, SecAggError, TaskRefused
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import Charge, Policy
from fedcore.privacy.discrete import preload
from fedcore.protocol import ANALYTICS_CAPABILITY
from fedcore.secagg import wire
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.messages import RoundSetup
from fedcore.secagg.participant import Participant
from fedcore.secagg.participation import ParticipationLog
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from .gate import Gate
from .trainer import EvalOutput, FitOutput, Trainer, TrainingFailed

__all__ = [
    "ANALYTICS_CAPABILITY",
    "EXACT_ENV",
    "CompiledQuery",
    "QueryResponder",
    "TableOnlyTrainer",
]

log = logging.getLogger("fedcore.worker")

#: Set to 1 in a worker's environment to answer without noise (tests only; never private).
EXACT_ENV = "FEDCORE_ANALYTICS_EXACT_FOR_TESTS"
#: Queries open at once on one worker (the coordinator runs one at a time).
_MAX_OPEN = 4

Send = Callable[[pb.WorkerMessage], Awaitable[None]]


@dataclass(frozen=True)
class CompiledQuery:
    """A query as the gate's check admitted it: parsed and laid out against the public
    schema once, its secure round's setup checked, and its charge. The answer runs from it."""

    layout: Layout
    setup: RoundSetup
    charge: Charge


@dataclass
class _Open:
    """One admitted query, from acceptance to unmasking."""

    task: pb.QueryTask
    layout: Layout
    scaled: np.ndarray  # exact local sums, each divided by its sensitivity
    noise_multiplier: float
    charge: Charge
    client: SecAggClient
    divisor: int  # honest shares this silo relies on (its policy, capped by the silos)
    budget_left: tuple[float, float]  # epsilon left once charged, at the budget's delta
    round: Participant | None = None


def _left(budget: tuple[float, float]) -> tuple[float, float]:
    """The budget left once admitted (never below 0: a rounding of the same computation)."""
    return max(budget[0], 0.0), budget[1]


class TableOnlyTrainer(Trainer):
    """The trainer of a worker that serves a table for analytics: it trains nothing."""

    def __init__(self, table: Table) -> None:
        self._rows = table.num_rows

    @property
    def num_examples(self) -> int:
        return self._rows

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        raise TrainingFailed("this worker serves a table for analytics queries; it trains no model")

    def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
        raise TrainingFailed(
            "this worker serves a table for analytics queries; it evaluates no model"
        )


class QueryResponder:
    """Answers analytics queries over ``table`` described by ``metadata``.

    Args:
        table: the local rows (never sent).
        metadata: the table's public description (its columns' bounds and categories).
        exact: answer without noise (tests only: see :data:`EXACT_ENV`).
        identity: this silo's signing key and roster: answer only signed secure rounds.
        participation: the on-disk record of masked contributions (each signed query once).
    """

    def __init__(
        self,
        table: Table,
        metadata: DatasetMetadata,
        *,
        exact: bool = False,
        identity: SiloIdentity | None = None,
        participation: ParticipationLog | None = None,
    ) -> None:
        self.table = table
        self.metadata = metadata
        self.schema = {f.name: f for f in metadata.features}
        self.exact = exact
        self.identity = identity
        self.participation = participation
        self.answered = 0
        self.refused = 0
        #: Refusals by rule. None depends on the data (see the module docstring); the counts
        #: let an operator see a scientist probing the rules (the coordinator knows who).
        self.refusals: Counter[str] = Counter()
        self._open: dict[str, _Open] = {}
        self._gate: Gate | None = None
        if exact:
            log.warning(
                "%s is set: analytics answers carry NO noise (test mode, not private)", EXACT_ENV
            )

    def reset(self) -> None:
        """A new session: the queries of the last one can never complete; forget them."""
        for current in self._open.values():
            current.client.abort()  # no coordinator to tell: the stream is gone
        self._open.clear()

    def attach(self, gate: Gate) -> None:
        """Register this responder's check with the worker's gate, and load the noise
        sampler in the background (not inside a query's timed phases)."""
        gate.register_query(self.check)
        self._gate = gate
        if not self.exact:
            threading.Thread(target=preload, name="load-opendp", daemon=True).start()

    # ------------------------------------------------------------------ the gate's check

    def _layout(self, task: pb.QueryTask) -> Layout:
        try:
            return plan_layout(parse_query(task.query), self.schema)
        except QueryError as exc:
            raise TaskRefused("analytics.query", str(exc)) from None

    def _check_setup(self, task: pb.QueryTask, policy: Policy) -> RoundSetup:
        try:
            setup = wire.setup_from_proto(task.secagg)
        except (ProtocolError, ConfigError) as exc:
            raise TaskRefused("secure-aggregation.setup", str(exc)) from None
        if not task.HasField("secagg") or setup.round_id != task.query_id:
            raise TaskRefused(
                "secure-aggregation.required", "every query answer is securely aggregated"
            )
        if setup.fixed_point != FIXED_POINT or setup.weight_norm != 1.0:
            raise TaskRefused(
                "secure-aggregation.setup", "the query's fixed-point format is not the standard one"
            )
        self._check_signed(task, setup)
        if task.silos < policy.privacy.min_group_size or setup.threshold != task.silos:
            raise TaskRefused(
                "secure-aggregation.setup",
                f"a query's noise is shared by {task.silos} silo(s) and the round's threshold "
                f"is {setup.threshold}; this worker needs all silos in the sum (threshold = "
                f"silos) and at least {policy.privacy.min_group_size} of them",
            )
        if policy.privacy.max_silos is not None and task.silos > policy.privacy.max_silos:
            raise TaskRefused(
                "secure-aggregation.max-silos",
                f"the query's secure round has {task.silos} silos; this silo's policy allows "
                f"at most {policy.privacy.max_silos}",
                by="policy",
            )
        assert policy.analytics is not None  # check_query refuses otherwise
        most = policy.analytics.network.max_silos
        if most is not None and task.silos > most:
            raise TaskRefused(
                "analytics.max-silos",
                f"the query claims {task.silos} silos share its noise; this silo shares noise "
                f"with at most {most}",
                by="policy",
            )
        return setup

    def _check_signed(self, task: pb.QueryTask, setup: RoundSetup) -> None:
        """A silo with a signing key answers only signed rounds, of one group of all the
        silos the query names, bound to the query (the client checks the names against the
        roster when it signs its keys)."""
        if self.identity is None:
            return
        if not setup.signed:
            raise TaskRefused(
                "secure-aggregation.signed",
                "this silo requires signed secure aggregation (it has a roster), but the "
                "query's round names no silos; start the coordinator with --secagg-signed",
            )
        if (
            len(setup.members) != task.silos
            or setup.group_size != task.silos
            or (setup.job, setup.round_number) != (query_job(task.query_id), 1)
        ):
            raise TaskRefused(
                "secure-aggregation.setup",
                f"the signed round names {len(setup.members)} silo(s) in groups of "
                f"{setup.group_size} for job {setup.job!r}; a query's round is one group of "
                f"all {task.silos} silos, bound to the query",
            )

    def check(self, task: pb.QueryTask, policy: Policy) -> CompiledQuery:
        """Everything about ``task`` but the budget (the gate checks that next), compiled once:
        the answer uses this very layout and setup."""
        layout = self._layout(task)
        rules = check_query(
            policy.analytics,
            layout.query,
            epsilon=task.epsilon,
            delta=task.delta,
            declared=tuple(self.schema),
        )
        if layout.words > MAX_WORDS:
            raise TaskRefused(
                "analytics.size", f"the query releases {layout.words} sums, at most {MAX_WORDS}"
            )
        setup = self._check_setup(task, policy)
        budget = policy.budget
        assert budget is not None  # the policy parser requires one with [analytics]
        z = noise_multiplier_for(task.epsilon, task.delta)
        check_cost(rules, epsilon=epsilon_for(z, budget.delta), ledger_delta=budget.delta)
        charge = charge_for(z, f"query {task.query_id}: {layout.query.text()}")
        return CompiledQuery(layout, setup, charge)

    def _admit(self, task: pb.QueryTask, gate: Gate) -> _Open:
        """Run in a thread: the gate's verdict, then the exact scaled sums of the query it
        compiled (measured once admitted, never before)."""
        compiled = gate.admit_query(task)
        assert isinstance(compiled, CompiledQuery)  # the check this responder registered
        policy = gate.policy
        layout = compiled.layout
        sums = local_sums(layout, self.table)
        rules = ClientRules(
            min_group_size=policy.privacy.min_group_size,
            min_threshold=policy.privacy.min_threshold,
            min_survivors=task.silos,
            max_silos=policy.privacy.max_silos,
        )
        assert policy.analytics is not None  # admitted: the policy answers queries
        return _Open(
            task,
            layout,
            sums.values / layout.scale_vector(),
            compiled.charge.noise_multiplier,
            compiled.charge,
            SecAggClient(compiled.setup, rules=rules, identity=self.identity),
            policy.analytics.network.share_divisor(task.silos),
            _left(gate.budget_left(compiled.charge)),
        )

    # ------------------------------------------------------------------ the stream

    @staticmethod
    def _message(task: pb.QueryTask, **fields: object) -> pb.WorkerMessage:
        """A message of ``task``'s query, naming its job (the coordinator routes by it)."""
        body = pb.AnalyticsWorkerMessage(job_id=task.job_id, **fields)  # type: ignore[arg-type]
        return pb.WorkerMessage(analytics=body)

    async def _refuse(self, send: Send, task: pb.QueryTask, refusal: TaskRefused) -> None:
        query_id = task.query_id
        self.refused += 1
        self.refusals[refusal.rule] += 1
        log.warning(
            "query %s %s (refusal %d by rule %s)",
            query_id,
            refusal,
            self.refusals[refusal.rule],
            refusal.rule,
        )
        body = pb.QueryRefusal(
            query_id=query_id,
            rule=refusal.rule,
            reason=refusal.reason,
            awaiting_approval=isinstance(refusal, AwaitingApproval),
        )
        await send(self._message(task, refusal=body))

    async def handle(self, message: pb.AnalyticsCoordinatorMessage, send: Send) -> None:
        """One analytics message from the coordinator."""
        kind = message.WhichOneof("body")
        if kind == "task":
            await self._start(message.task, send)
        elif kind == "secagg":
            await self._secagg(message.secagg, message.job_id)

    async def _start(self, task: pb.QueryTask, send: Send) -> None:
        gate = self._gate
        if gate is None:
            raise RuntimeError("QueryResponder.attach(gate) was not called")
        if task.query_id in self._open or len(self._open) >= _MAX_OPEN:
            refusal = TaskRefused("analytics.busy", "too many queries open on this worker")
            await self._refuse(send, task, refusal)
            return
        log.info("query %s: %r at epsilon %g", task.query_id, task.query, task.epsilon)
        try:
            current = await asyncio.to_thread(self._admit, task, gate)
        except TaskRefused as refusal:
            await self._refuse(send, task, refusal)
            return
        self._open[task.query_id] = current
        accept = pb.QueryAccept(
            query_id=task.query_id,
            noise_multiplier=current.noise_multiplier,
            epsilon=epsilon_for(current.noise_multiplier, task.delta),
            delta=task.delta,
            vector_words=masked_words(current.layout.words),
            exact_test_mode=self.exact,
            budget_left=current.budget_left[0],
            budget_delta=current.budget_left[1],
            noise_variance=0.0
            if self.exact
            else share_variance(current.layout, current.noise_multiplier, current.divisor),
        )
        await send(self._message(task, accept=accept))

        async def send_secagg(message: pb.SecAggWorkerMessage) -> None:
            await send(self._message(task, secagg=message))

        async def on_shares() -> None:
            await self._send_masked(current, send)

        current.round = Participant(
            current.client,
            send_secagg,
            label=f"query {task.query_id}",
            on_shares=on_shares,
            on_end=lambda revealed: self._ended(current, revealed),
        )
        await current.round.start()

    def _ended(self, current: _Open, revealed: bool) -> None:
        self._open.pop(current.task.query_id, None)
        if revealed:
            self.answered += 1
            log.info("query %s answered", current.task.query_id)

    async def _secagg(self, message: pb.SecAggCoordinatorMessage, job: str) -> None:
        kind = message.WhichOneof("body")
        if kind is None:
            return
        current = self._open.get(getattr(message, kind).round_id)
        # Only the query's own job's messages reach its round.
        if current is not None and current.round is not None and current.task.job_id == job:
            await current.round.handle(message)

    async def _send_masked(self, current: _Open, send: Send) -> None:
        """Record the participation (signed rounds), charge the ledger, add this silo's noise
        share, mask, send."""
        gate = self._gate
        assert gate is not None
        assert current.round is not None
        task = current.task
        setup = current.client.setup
        if self.participation is not None and setup.signed:
            # On disk before the masked answer exists: a replay of this signed query, even
            # after a restart, is refused. The answer is a fresh DP release charged to the
            # ledger, so no model-distance rule applies.
            await asyncio.to_thread(self.participation.admit, setup, None, distributed_dp=True)
        try:
            await asyncio.to_thread(gate.release_query, current.charge, task)
        except TaskRefused as refusal:
            await current.round.give_up(str(refusal), tell=True)
            await self._refuse(send, task, refusal)
            return
        if self.exact:
            vector = current.scaled.copy()
        else:
            vector = await asyncio.to_thread(
                noisy_share,
                current.layout,
                current.scaled,
                current.noise_multiplier,
                current.divisor,
            )
        if current.client.state is not ClientState.READY:
            raise SecAggError("the secure round is not ready for this silo's input")
        masked = await asyncio.to_thread(current.client.mask, vector, 1)
        if masked.clipped:
            log.warning(
                "query %s: %d sum(s) exceeded the fixed-point range", task.query_id, masked.clipped
            )
        data = masked.vector.astype("<u8", copy=False).tobytes()
        await send(self._message(task, masked=pb.QueryMasked(query_id=task.query_id, masked=data)))
