"""Federated analytics on the worker: answer queries over a local table, through the gate.

A :class:`QueryResponder` registers its check with the worker's :class:`~.gate.Gate`; each
``QueryTask`` then goes::

    admitted by the gate (parse, columns, epsilon, delta, network, budget) ─▶ QueryAccept + keys
    secure round: peers ─▶ shares ─▶ (charge the ledger, add the noise share, mask) ─▶ QueryMasked
    unmasking request ─▶ unmasking shares

or is refused with the rule and the reason (``QueryRefusal``). The query text is parsed
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

from fedcore.analytics.encoding import FIXED_POINT, MAX_WORDS, masked_words
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
from fedcore.errors import ConfigError, ProtocolError, SecAggError, TaskRefused
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import Charge, Policy
from fedcore.privacy.discrete import preload
from fedcore.protocol import ANALYTICS_CAPABILITY
from fedcore.secagg import wire
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.messages import RoundSetup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from .gate import Gate
from .trainer import EvalOutput, FitOutput, Trainer, TrainingFailed

__all__ = ["ANALYTICS_CAPABILITY", "EXACT_ENV", "QueryResponder", "TableOnlyTrainer"]

log = logging.getLogger("fedcore.worker")

#: Set to 1 in a worker's environment to answer without noise (tests only; never private).
EXACT_ENV = "FEDCORE_ANALYTICS_EXACT_FOR_TESTS"
#: Queries open at once on one worker (the coordinator runs one at a time).
_MAX_OPEN = 4

Send = Callable[[pb.WorkerMessage], Awaitable[None]]


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
    """

    def __init__(self, table: Table, metadata: DatasetMetadata, *, exact: bool = False) -> None:
        self.table = table
        self.metadata = metadata
        self.schema = {f.name: f for f in metadata.features}
        self.exact = exact
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
            current.client.abort()
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
        if task.silos < policy.privacy.min_group_size or setup.threshold != task.silos:
            raise TaskRefused(
                "secure-aggregation.setup",
                f"a query's noise is shared by {task.silos} silo(s) and the round's threshold "
                f"is {setup.threshold}; this worker needs all silos in the sum (threshold = "
                f"silos) and at least {policy.privacy.min_group_size} of them",
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

    def check(self, task: pb.QueryTask, policy: Policy) -> Charge:
        """Everything about ``task`` but the budget (the gate checks that next)."""
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
        self._check_setup(task, policy)
        budget = policy.budget
        assert budget is not None  # the policy parser requires one with [analytics]
        z = noise_multiplier_for(task.epsilon, task.delta)
        check_cost(rules, epsilon=epsilon_for(z, budget.delta), ledger_delta=budget.delta)
        return charge_for(z, f"query {task.query_id}: {layout.query.text()}")

    def _admit(self, task: pb.QueryTask, gate: Gate) -> _Open:
        """Run in a thread: the gate's verdict, then the exact scaled sums."""
        charge = gate.admit_query(task)
        policy = gate.policy
        setup = self._check_setup(task, policy)
        layout = self._layout(task)
        sums = local_sums(layout, self.table)
        rules = ClientRules(
            min_group_size=policy.privacy.min_group_size,
            min_threshold=policy.privacy.min_threshold,
            min_survivors=task.silos,
        )
        assert policy.analytics is not None  # admitted: the policy answers queries
        return _Open(
            task,
            layout,
            sums.values / layout.scale_vector(),
            charge.noise_multiplier,
            charge,
            SecAggClient(setup, rules=rules),
            policy.analytics.network.share_divisor(task.silos),
        )

    # ------------------------------------------------------------------ the stream

    @staticmethod
    def _message(**fields: object) -> pb.WorkerMessage:
        return pb.WorkerMessage(analytics=pb.AnalyticsWorkerMessage(**fields))  # type: ignore[arg-type]

    async def _refuse(self, send: Send, query_id: str, refusal: TaskRefused) -> None:
        self.refused += 1
        self.refusals[refusal.rule] += 1
        log.warning(
            "query %s %s (refusal %d by rule %s)",
            query_id,
            refusal,
            self.refusals[refusal.rule],
            refusal.rule,
        )
        body = pb.QueryRefusal(query_id=query_id, rule=refusal.rule, reason=refusal.reason)
        await send(self._message(refusal=body))

    async def handle(self, message: pb.AnalyticsCoordinatorMessage, send: Send) -> None:
        """One analytics message from the coordinator."""
        kind = message.WhichOneof("body")
        if kind == "task":
            await self._start(message.task, send)
        elif kind == "secagg":
            await self._secagg(message.secagg, send)

    async def _start(self, task: pb.QueryTask, send: Send) -> None:
        gate = self._gate
        if gate is None:
            raise RuntimeError("QueryResponder.attach(gate) was not called")
        if task.query_id in self._open or len(self._open) >= _MAX_OPEN:
            refusal = TaskRefused("analytics.busy", "too many queries open on this worker")
            await self._refuse(send, task.query_id, refusal)
            return
        log.info("query %s: %r at epsilon %g", task.query_id, task.query, task.epsilon)
        try:
            current = await asyncio.to_thread(self._admit, task, gate)
        except TaskRefused as refusal:
            await self._refuse(send, task.query_id, refusal)
            return
        self._open[task.query_id] = current
        accept = pb.QueryAccept(
            query_id=task.query_id,
            noise_multiplier=current.noise_multiplier,
            epsilon=epsilon_for(current.noise_multiplier, task.delta),
            delta=task.delta,
            vector_words=masked_words(current.layout.words),
            exact_test_mode=self.exact,
            noise_variance=0.0
            if self.exact
            else share_variance(current.layout, current.noise_multiplier, current.divisor),
        )
        await send(self._message(accept=accept))
        keys = wire.keys_to_proto(task.query_id, current.client.advertise())
        await send(self._message(secagg=pb.SecAggWorkerMessage(keys=keys)))

    async def _abandon(self, current: _Open, send: Send, reason: str) -> None:
        self._open.pop(current.task.query_id, None)
        current.client.abort()
        abort = pb.SecAggAbort(round_id=current.task.query_id, reason=reason)
        await send(self._message(secagg=pb.SecAggWorkerMessage(abort=abort)))

    async def _secagg(self, message: pb.SecAggCoordinatorMessage, send: Send) -> None:
        kind = message.WhichOneof("body")
        if kind is None:
            return
        body = getattr(message, kind)
        current = self._open.get(body.round_id)
        if current is None:
            return
        client = current.client
        rid = current.task.query_id

        def out(**fields: object) -> pb.WorkerMessage:
            return self._message(secagg=pb.SecAggWorkerMessage(**fields))  # type: ignore[arg-type]

        try:
            if kind == "peers":
                shares = client.share_keys(wire.directory_from_proto(body))
                await send(out(shares=wire.shares_to_proto(rid, shares)))
            elif kind == "shares":
                client.receive_shares(wire.shares_from_proto(body))
                await self._send_masked(current, send)
            elif kind == "unmask":
                response = client.unmask(wire.request_from_proto(body))
                await send(out(unmask=wire.response_to_proto(rid, response)))
                self._open.pop(rid, None)
                self.answered += 1
                log.info("query %s answered", rid)
            elif kind == "abort":
                self._open.pop(rid, None)
                client.abort()
                log.warning("query %s abandoned by the coordinator: %s", rid, body.reason)
        except SecAggError as exc:
            log.warning("query %s: secure aggregation abandoned: %s", rid, exc)
            await self._abandon(current, send, str(exc))

    async def _send_masked(self, current: _Open, send: Send) -> None:
        """Charge the ledger, add this silo's noise share, mask, send."""
        gate = self._gate
        assert gate is not None
        task = current.task
        try:
            await asyncio.to_thread(gate.release_query, current.charge)
        except TaskRefused as refusal:
            await self._abandon(current, send, str(refusal))
            await self._refuse(send, task.query_id, refusal)
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
        await send(self._message(masked=pb.QueryMasked(query_id=task.query_id, masked=data)))
