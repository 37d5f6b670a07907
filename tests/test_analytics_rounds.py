"""A query's whole protocol in memory: the coordinator's QueryRound against three workers'
QueryResponders behind their real gates, with the noise on, and a hostile coordinator."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from fedcore.server.analytics.rounds import QueryRound
from fedcore.server.state.registry import SessionState
from fedcore.worker.analytics import QueryResponder
from fedcore.worker.gate import Gate
from fedcore.worker.policy import PolicyGuard

from fedcore.analytics.encoding import round_setup
from fedcore.analytics.layout import plan_layout
from fedcore.analytics.mechanism import noise_multiplier_for, noise_std
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import DatasetMetadata, FeatureInfo
from fedcore.data.table import Table
from fedcore.errors import QueryRefusedError, TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.policy import load_policy
from fedcore.secagg import wire
from fedcore.v1 import fedcore_pb2 as pb

FEATURES = (FeatureInfo("age", "float64", minimum=0.0, maximum=100.0),)
SCHEMA = {f.name: f for f in FEATURES}


class _Silo:
    """A worker's stream in memory: messages are handled in order by its responder."""

    def __init__(self, name: str, responder: QueryResponder) -> None:
        self.name = name
        self.worker_id = name
        self.state = SessionState.IDLE
        self.responder = responder
        self.round: QueryRound | None = None
        self.inbox: asyncio.Queue[pb.CoordinatorMessage] = asyncio.Queue()
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    def send_urgent(self, message: pb.CoordinatorMessage) -> None:
        self.inbox.put_nowait(message)

    async def _reply(self, message: pb.WorkerMessage) -> None:
        assert self.round is not None
        self.round.on_message(self, message.analytics)  # type: ignore[arg-type]

    async def _pump(self) -> None:
        while True:
            message = await self.inbox.get()
            await self.responder.handle(message.analytics, self._reply)


def _silo(tmp_path: Path, i: int, ages: np.ndarray, budget: float) -> QueryResponder:
    policy_path = tmp_path / f"policy{i}.toml"
    policy_path.write_text(
        f'[budget]\nstudy = "s"\nepsilon = {budget}\ndelta = 1e-5\nledger = "ledger{i}.json"\n'
        "[analytics]\nmin-count = 3\nmax-epsilon = 2.0\n"
    )
    policy = load_policy(policy_path)
    guard = PolicyGuard(policy, num_examples=len(ages))
    gate = Gate(ModelCatalog(None), max_model_bytes=1 << 20, guard=guard)
    table = Table({"age": ages}, len(ages))
    responder = QueryResponder(table, DatasetMetadata(f"silo {i}", features=FEATURES))
    responder.attach(gate)
    return responder


async def _ask(
    silos: list[_Silo], text: str, epsilon: float, query_id: str
) -> tuple[np.ndarray, QueryRound]:
    layout = plan_layout(parse_query(text), SCHEMA)
    round_ = QueryRound(
        query_id,
        layout,
        epsilon=epsilon,
        delta=1e-6,
        noise_multiplier=noise_multiplier_for(epsilon, 1e-6),
        sessions=silos,  # type: ignore[arg-type]
        phase_timeout=20.0,
    )
    for s in silos:
        s.round = round_
    outcome = await round_.run(layout.query.text())
    return outcome.totals, round_


async def test_noisy_answers_through_the_whole_protocol_err_at_the_calibrated_scale(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    parts = [rng.uniform(20, 90, 50) for _ in range(3)]
    responders = [_silo(tmp_path, i, ages, budget=1e9) for i, ages in enumerate(parts)]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    truth = sum(len(p) for p in parts)
    layout = plan_layout(parse_query("count()"), SCHEMA)
    std = float(noise_std(layout, noise_multiplier_for(1.0, 1e-6))[0])
    errors = []
    for k in range(30):
        totals, _ = await _ask(silos, "count()", 1.0, f"q{k}")
        errors.append((totals[0] - truth) / std)
    # 30 standardized errors of N(0, 1): their std is within [0.6, 1.4] with probability
    # far above 0.999, and their mean within 4/sqrt(30).
    assert 0.6 < float(np.std(errors)) < 1.4
    assert abs(float(np.mean(errors))) < 4 / math.sqrt(30)
    assert all(r.answered == 30 for r in responders)
    charges = responders[0]._gate.guard.ledger.charges()  # type: ignore[union-attr]
    assert len(charges) == 30
    for s in silos:
        s.pump.cancel()


async def test_a_silo_over_budget_refuses_and_nothing_is_revealed(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    budgets = [5.0, 5.0, 0.6]
    responders = [_silo(tmp_path, i, rng.uniform(20, 90, 40), b) for i, b in enumerate(budgets)]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    await _ask(silos, "mean(age)", 0.5, "first")  # positive control: within every budget
    with pytest.raises(QueryRefusedError, match=r"silo 'silo-2': \[budget\]"):
        await _ask(silos, "mean(age)", 0.5, "second")
    # Only the accepted query was charged, on every silo.
    for r in responders:
        assert len(r._gate.guard.ledger.charges()) == 1  # type: ignore[union-attr]
    for s in silos:
        s.pump.cancel()


def _task(responder: QueryResponder, **changes: object) -> pb.QueryTask:
    silos = int(changes.pop("silos", 3))  # type: ignore[call-overload]
    threshold = int(changes.pop("threshold", silos))  # type: ignore[call-overload]
    setup = round_setup("q", silos, 10.0)
    proto = wire.setup_to_proto(setup)
    proto.threshold = threshold
    task = pb.QueryTask(
        query_id="q", query="mean(age)", epsilon=0.5, delta=1e-6, silos=silos, secagg=proto
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


def test_the_gate_refuses_a_hostile_coordinators_queries(tmp_path: Path) -> None:
    responder = _silo(tmp_path, 0, np.linspace(20, 80, 30), budget=5.0)
    gate = responder._gate
    assert gate is not None
    assert gate.admit_query(_task(responder)).noise_multiplier > 1  # positive control
    attacks = [
        ({"threshold": 2}, "secure-aggregation.setup"),  # unmask a sum without every silo
        ({"silos": 2, "threshold": 2}, "secure-aggregation.setup"),  # a group below 3
        ({"query": "rows()"}, "analytics.query"),
        ({"query": "mean(age) where __import__ > 0"}, "analytics.query"),
        ({"epsilon": math.inf}, "analytics.max-epsilon"),
        ({"epsilon": -1.0}, "analytics.max-epsilon"),
        ({"delta": 0.0}, "analytics.delta"),
    ]
    for changes, rule in attacks:
        with pytest.raises(TaskRefused) as refused:
            gate.admit_query(_task(responder, **changes))
        assert refused.value.rule == rule, changes
    task = _task(responder)
    task.secagg.quant_bits = 16  # a coarser format than the standard one
    with pytest.raises(TaskRefused, match="fixed-point"):
        gate.admit_query(task)
