"""The coordinator's per-scientist limit on refused queries, through the real Analytics gRPC
service: its frontend, the query round and three silos behind their real gates (in memory, no
processes). Past the limit a scientist's queries are RESOURCE_EXHAUSTED and no silo hears of
them; another scientist is unaffected; the window passing lifts the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.analytics.client import AnalyticsClient, connect
from fedcore.analytics.query import QueryError
from fedcore.data.metadata import DatasetMetadata, FeatureInfo
from fedcore.data.table import Table
from fedcore.enrollment import Enrollment, EnrollmentEntry, hash_token
from fedcore.errors import FedcoreError, QueryRefusedError
from fedcore.model_catalog import ModelCatalog
from fedcore.policy import load_policy
from fedcore.protocol import ANALYTICS_CAPABILITY
from fedcore.server.analytics.frontend import AnalyticsFrontend
from fedcore.server.analytics.refusals import RefusalLimiter
from fedcore.server.analytics.service import AnalyticsService
from fedcore.server.state.analytics import AnalyticsSettings
from fedcore.server.state.registry import WorkerRegistry, WorkerSession
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.analytics import QueryResponder
from fedcore.worker.gate import Gate
from fedcore.worker.policy import PolicyGuard

FEATURES = (FeatureInfo("age", "float64", minimum=0.0, maximum=100.0),)
LIMIT = 3


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _responder(root: Path, i: int) -> QueryResponder:
    policy_path = root / f"policy{i}.toml"
    policy_path.write_text(
        f'[budget]\nstudy = "s"\nepsilon = 100\ndelta = 1e-5\nledger = "ledger{i}.json"\n'
        "[analytics]\nmax-epsilon = 2.0\nhonest-silos = 3\n"
    )
    ages = np.random.default_rng(i).uniform(20, 90, 40)
    guard = PolicyGuard(load_policy(policy_path), num_examples=len(ages))
    gate = Gate(ModelCatalog(None), max_model_bytes=1 << 20, guard=guard)
    responder = QueryResponder(
        Table({"age": ages}, len(ages)), DatasetMetadata(f"silo {i}", features=FEATURES)
    )
    responder.attach(gate)
    return responder


async def _pump(
    session: WorkerSession, responder: QueryResponder, frontend: AnalyticsFrontend, seen: list[int]
) -> None:
    """The worker's end of its Join stream, in memory."""

    async def reply(message: pb.WorkerMessage) -> None:
        frontend.route(session, message.analytics)

    while True:
        item = await session.next_outgoing()
        if item is None:
            return
        assert isinstance(item, pb.CoordinatorMessage)
        if item.analytics.WhichOneof("body") == "task":
            seen[0] += 1
        await responder.handle(item.analytics, reply)


@dataclass
class _Service:
    address: str
    clock: _Clock
    tasks_seen: list[int]
    tokens: dict[str, Path]

    def client(self, who: str) -> AnalyticsClient:
        return connect(self.address, token_file=self.tokens[who], timeout=60)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[_Service]:
    scientists = Enrollment.empty(tmp_path / "scientists.json", section="scientists")
    tokens = {}
    for who in ("alice", "bob"):
        scientists.set(who, EnrollmentEntry(hash_token(f"token-{who}")))
        tokens[who] = tmp_path / f"{who}.token"
        tokens[who].write_text(f"token-{who}\n")
    scientists.save()
    settings = AnalyticsSettings(tmp_path / "scientists.json", refusal_limit=LIMIT)
    registry = WorkerRegistry()
    frontend = AnalyticsFrontend(settings, registry)
    seen = [0]
    pumps = []
    for i in range(3):
        responder = _responder(tmp_path, i)
        hello = pb.Hello(
            name=f"silo-{i}",
            num_examples=40,
            capabilities=[ANALYTICS_CAPABILITY],
            dataset=DatasetMetadata(f"silo {i}", features=FEATURES).to_proto(),
        )
        session = registry.new_session(hello, "memory")
        await registry.activate(session)
        pumps.append(asyncio.create_task(_pump(session, responder, frontend, seen)))
    clock = _Clock()
    limiter = RefusalLimiter(limit=LIMIT, window=settings.refusal_window, clock=clock)
    server = grpc.aio.server()
    AnalyticsService(
        frontend, Enrollment(settings.scientists, section="scientists"), limiter
    ).register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield _Service(f"127.0.0.1:{port}", clock, seen, tokens)
    finally:
        await server.stop(None)
        for session in registry.sessions():
            session.close("test over")
        await asyncio.gather(*pumps)


async def test_refused_queries_past_the_limit_are_refused_without_asking_a_silo(
    service: _Service,
) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        # Positive control: the harness answers through all three silos.
        answer = await asyncio.to_thread(alice.query, "count()", epsilon=0.5)
        assert answer.value > 0
        assert service.tasks_seen[0] == 3
        # Data-independent refusals, counted: an unknown column (the coordinator's schema
        # check) and the silos' epsilon cap (every silo refuses).
        with pytest.raises(QueryError, match="weight"):
            await asyncio.to_thread(alice.query, "mean(weight)", epsilon=0.5)
        with pytest.raises(QueryRefusedError, match="max-epsilon"):
            await asyncio.to_thread(alice.query, "mean(age)", epsilon=5.0)
        with pytest.raises(QueryRefusedError, match="max-epsilon"):
            await asyncio.to_thread(alice.query, "mean(age)", epsilon=6.0)
        asked = service.tasks_seen[0]
        # The limit is reached: even a good query is refused by the coordinator, unasked.
        with pytest.raises(FedcoreError, match=r"RESOURCE_EXHAUSTED.*refusal-limit") as err:
            await asyncio.to_thread(alice.query, "count()", epsilon=0.5)
        assert not isinstance(err.value, QueryRefusedError)
        assert service.tasks_seen[0] == asked
        # Another scientist is not limited by alice's refusals.
        await asyncio.to_thread(bob.query, "count()", epsilon=0.5)
        assert service.tasks_seen[0] == asked + 3
        # After the window, alice may ask again.
        service.clock.now += 3600.0 + 1
        await asyncio.to_thread(alice.query, "count()", epsilon=0.5)


def test_the_limiter_counts_a_sliding_window() -> None:
    clock = _Clock()
    limiter = RefusalLimiter(limit=2, window=10.0, clock=clock)
    limiter.record("a")
    clock.now += 5
    limiter.record("a")
    assert limiter.blocked_for("a") == pytest.approx(5.0)
    assert limiter.blocked_for("b") is None
    clock.now += 5  # the first refusal leaves the window
    assert limiter.blocked_for("a") is None
    with pytest.raises(ValueError, match="at least 1"):
        RefusalLimiter(limit=0, window=1.0)
