"""A secure round's model waits for the key directory, per worker (issue 28, stop 33).

Over a long link the model's bytes already in flight hold back any message queued after them,
so the coordinator sends the model's first chunk with the task (it keeps the link busy during
the keys' round trip) and holds the rest until that worker's key directory is written:

* in a secure round the directory is written before the model's second chunk (fails on the
  old coordinator, which wrote the whole model at once), and a plain round's order is
  unchanged;
* a round whose keys phase fails, a member dropped in phase 1, a round cancelled mid-phase
  (coordinator shutdown) and a session closed while its model is held leave no writer
  waiting, and the stream carries on: the next task's model is written;
* the worker expands its masks once the directory is in; a peer that dropped out between
  the directory and the relayed shares is taken out again, bit-exact (a wrong set is not).

The streams are the real service's (``CoordinatorService.join``) over in-memory contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from test_coordinator import config, initial_weights
from test_job_traffic import _Context

from fedcore.protocol import PROTOCOL_VERSION
from fedcore.secagg import SecAggParams, crypto, wire
from fedcore.secagg import client as client_module
from fedcore.secagg.client import ClientRules, ClientState, SecAggClient
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.server.engine.collectors import FitCollector
from fedcore.server.engine.context import RoundContext
from fedcore.server.engine.reports import ReportPipeline
from fedcore.server.engine.secagg import SecAggCollector
from fedcore.server.state.registry import SessionState, WorkerRegistry, WorkerSession
from fedcore.server.transport.auth import Authenticator
from fedcore.server.transport.service import CoordinatorService
from fedcore.strategy import FedAvg
from fedcore.v1 import fedcore_pb2 as pb

N = 3
RULES = ClientRules(min_group_size=2, min_threshold=0.01)
#: Short phases: the tests that let a phase time out wait this long.
PARAMS = SecAggParams(threshold=2, clip=2.0, bits=20, phase_timeout=0.3)
CHUNK_BYTES = 4096  # the test model spans several chunks


@dataclass
class Silo:
    stream: _Context
    session: WorkerSession
    join: asyncio.Task[None]

    def kinds(self) -> list[str]:
        """What was written on the stream after the welcome: chunks as "chunk", secure
        messages by their body ("peers", "abort", ...), others by theirs ("task")."""
        out: list[str] = []
        for item in self.stream.written[1:]:
            if isinstance(item, bytes):
                out.append("chunk")
            elif item.WhichOneof("body") == "secagg":
                out.append(str(item.secagg.WhichOneof("body")))
            else:
                out.append(str(item.WhichOneof("body")))
        return out

    def task(self, index: int = -1) -> pb.Task:
        tasks = [m.task for m in self.stream.written if isinstance(m, pb.CoordinatorMessage)]
        return [t for t in tasks if t.task_id][index]


@dataclass
class Federation:
    ctx: RoundContext
    silos: list[Silo]
    chunks: int  # per model


@contextlib.asynccontextmanager
async def federation() -> AsyncIterator[Federation]:
    cfg = config(chunk_bytes=CHUNK_BYTES)
    registry = WorkerRegistry()
    service = CoordinatorService(cfg, registry, None, (), Authenticator(None, mutual_tls=False))
    strategy = FedAvg()
    ctx = RoundContext(
        cfg, strategy, initial_weights(), service, ReportPipeline(strategy, None, ())
    )
    silos: list[Silo] = []
    try:
        for i in range(N):
            stream = _Context()
            join = asyncio.create_task(service.join(None, stream))  # type: ignore[arg-type]
            hello = pb.Hello(name=f"silo-{i}", protocol_version=PROTOCOL_VERSION, num_examples=10)
            stream.push(pb.WorkerMessage(hello=hello))
            await stream.until(lambda i=i: registry.by_name(f"silo-{i}") is not None, "joined")
            session = registry.by_name(f"silo-{i}")
            assert session is not None
            await stream.until(lambda s=session: s.state is SessionState.IDLE, "active")
            silos.append(Silo(stream, session, join))
        yield Federation(ctx, silos, ctx.payload().chunks)
    finally:
        for silo in silos:
            silo.session.close("test over")
        await asyncio.wait_for(asyncio.gather(*(s.join for s in silos)), 10)


def _secure_round(fed: Federation) -> SecAggCollector:
    """Round 1, secure, issued to every silo (the engine's order: tickets, then the wait)."""
    ctx = fed.ctx
    sessions = [s.session for s in fed.silos]
    aggregator = ctx.strategy.start_aggregation(1, ctx.weights)
    collector = SecAggCollector(1, aggregator, ctx.weights, PARAMS, sessions, 2)
    ctx.route_secagg(collector.on_message)
    payload = ctx.payload()
    for session in sessions:
        task = pb.Task(round=1, kind=pb.TASK_KIND_FIT, weights=payload.header)
        task.secagg.CopyFrom(collector.setup_proto())
        collector.add(ctx.issue(session, collector, task, payload))
    return collector


def _plain_task(fed: Federation, silo: Silo, round_number: int) -> None:
    ctx = fed.ctx
    collector = FitCollector(
        round_number, ctx.strategy.start_aggregation(round_number, ctx.weights), ctx.weights
    )
    payload = ctx.payload()
    task = pb.Task(round=round_number, kind=pb.TASK_KIND_FIT, weights=payload.header)
    collector.add(ctx.issue(silo.session, collector, task, payload))


def _keys(silo: Silo, collector: SecAggCollector) -> SecAggClient:
    """The silo's worker answers its task with keys (as ``fed-worker`` does at once)."""
    client = SecAggClient(wire.setup_from_proto(silo.task().secagg), rules=RULES)
    keys = wire.keys_to_proto(collector.setup.round_id, client.advertise())
    silo.stream.push(pb.WorkerMessage(secagg=pb.SecAggWorkerMessage(keys=keys)))
    return client


async def _model_written(silo: Silo, fed: Federation, models: int = 1) -> None:
    await silo.stream.until(
        lambda: silo.kinds().count("chunk") == models * fed.chunks, "the model was written"
    )


async def _next_round_works(fed: Federation, silo: Silo) -> None:
    """The worker answers its (ended) task with an error; its next task's model follows."""
    error = pb.TaskError(task_id=silo.task().task_id, code=pb.ERROR_CODE_TRAINING_FAILED)
    silo.stream.push(pb.WorkerMessage(error=error))
    await silo.stream.until(lambda: silo.session.state is SessionState.IDLE, "idle again")
    _plain_task(fed, silo, 2)
    await _model_written(silo, fed, models=2)
    assert silo.kinds()[-fed.chunks - 1 :] == ["task"] + ["chunk"] * fed.chunks


async def _stop(round_task: asyncio.Task[None]) -> None:
    round_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(round_task, 10)


async def test_the_directory_is_written_before_the_model_and_a_plain_round_is_unchanged() -> None:
    async with federation() as fed:
        # Control: a plain task's model follows its header at once, nothing in between.
        _plain_task(fed, fed.silos[0], 0)
        await _model_written(fed.silos[0], fed)
        assert fed.silos[0].kinds() == ["task"] + ["chunk"] * fed.chunks
        error = pb.TaskError(task_id=fed.silos[0].task().task_id, code=pb.ERROR_CODE_REFUSED)
        fed.silos[0].stream.push(pb.WorkerMessage(error=error))
        await fed.silos[0].stream.until(
            lambda: fed.silos[0].session.state is SessionState.IDLE, "idle again"
        )
        start = {id(s): len(s.kinds()) for s in fed.silos}

        collector = _secure_round(fed)
        round_task = asyncio.create_task(collector.wait(30))
        for silo in fed.silos:
            await silo.stream.until(lambda s=silo: "task" in s.kinds()[start[id(s)] :], "task")
            _keys(silo, collector)
        for silo in fed.silos:
            await _model_written(silo, fed, models=2 if silo is fed.silos[0] else 1)
            assert silo.kinds()[start[id(silo)] :] == ["task", "chunk", "peers"] + ["chunk"] * (
                fed.chunks - 1
            )
        await _stop(round_task)


async def test_a_keys_phase_that_fails_releases_every_model_and_the_streams_go_on() -> None:
    async with federation() as fed:
        collector = _secure_round(fed)
        round_task = asyncio.create_task(collector.wait(30))
        first = fed.silos[0]
        await first.stream.until(lambda: "task" in first.kinds(), "task")
        _keys(first, collector)  # one of three: below the threshold of 2
        for silo in fed.silos:
            await _model_written(silo, fed)
            assert silo.kinds() == ["task", "chunk", "abort"] + ["chunk"] * (fed.chunks - 1)
        await asyncio.wait_for(round_task, 10)
        assert not collector.results
        await _next_round_works(fed, fed.silos[1])


async def test_a_member_dropped_in_phase_1_gets_its_model_after_its_abort() -> None:
    async with federation() as fed:
        collector = _secure_round(fed)
        round_task = asyncio.create_task(collector.wait(30))
        late = fed.silos[2]
        for silo in fed.silos[:2]:
            await silo.stream.until(lambda s=silo: "task" in s.kinds(), "task")
            _keys(silo, collector)
        for silo in fed.silos:
            await _model_written(silo, fed)
        for silo in fed.silos[:2]:
            assert silo.kinds() == ["task", "chunk", "peers"] + ["chunk"] * (fed.chunks - 1)
        assert late.kinds() == ["task", "chunk", "abort"] + ["chunk"] * (fed.chunks - 1)
        assert "no keys in time" in late.stream.written[3].secagg.abort.reason  # type: ignore[union-attr]
        await _stop(round_task)
        await _next_round_works(fed, late)


async def test_a_round_cancelled_mid_phase_releases_the_models() -> None:
    """The coordinator shutting down cancels the round while it waits for keys."""
    async with federation() as fed:
        collector = _secure_round(fed)
        round_task = asyncio.create_task(collector.wait(30))
        for silo in fed.silos:
            await silo.stream.until(lambda s=silo: "task" in s.kinds(), "task")
        await _stop(round_task)
        for silo in fed.silos:
            await _model_written(silo, fed)
            assert silo.kinds() == ["task"] + ["chunk"] * fed.chunks
        await _next_round_works(fed, fed.silos[0])


async def test_a_session_closed_while_its_model_is_held_ends_its_writer() -> None:
    async with federation() as fed:
        collector = _secure_round(fed)
        round_task = asyncio.create_task(collector.wait(30))
        gone = fed.silos[0]
        await gone.stream.until(lambda: "task" in gone.kinds(), "task")
        gone.session.close("the coordinator is shutting down")
        await asyncio.wait_for(gone.join, 10)  # the writer did not wait at the gate
        assert gone.kinds() == ["task", "chunk"]
        await _stop(round_task)


# ---------------------------------------------------------------------- the worker's mask

D = 500
SETUP = make_setup(SecAggParams(threshold=2, clip=2.0, bits=20), 5, 50)


def _deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run draws the same keys and self-mask seeds (so two runs can be compared)."""
    drawn = itertools.count()

    def generate() -> crypto.KeyPair:
        private = hashlib.sha256(b"key %d" % next(drawn)).digest()
        return crypto.KeyPair(private, crypto.public_from_private(private))

    def token_bytes(n: int) -> bytes:
        return hashlib.sha256(b"seed %d" % next(drawn)).digest()[:n]

    monkeypatch.setattr(crypto.KeyPair, "generate", staticmethod(generate))
    monkeypatch.setattr(client_module, "secrets", SimpleNamespace(token_bytes=token_bytes))


def _masked(
    monkeypatch: pytest.MonkeyPatch, *, ahead: bool, dropped: tuple[int, ...]
) -> np.ndarray:
    """Worker 1's masked input in a round of 5 where ``dropped`` send no shares; its mask
    expanded once the directory is in (``ahead``) or from scratch when masking."""
    _deterministic(monkeypatch)
    clients = {
        u: SecAggClient(SETUP, rules=RULES, rounding_seed=bytes([u]) * 32) for u in range(1, 6)
    }
    server = SecAggServer(SETUP, 5, D + COUNT_WORDS, rng=random.Random(0))
    for u, c in clients.items():
        server.add_keys(u, c.advertise())
    directories = server.close_keys()
    shares = {u: c.share_keys(directories[u]) for u, c in clients.items()}
    me = clients[1]
    if ahead:
        me.prepare_mask(D + COUNT_WORDS)  # SHARED: the pairs of every peer in the directory
        assert me.state is ClientState.SHARED
    for u in clients:
        if u not in dropped:
            server.add_shares(u, shares[u])
    me.receive_shares(server.close_shares()[1])
    delta = np.random.default_rng(1).normal(0, 0.3, D).astype(np.float32)
    return me.mask(delta, 10).vector


@pytest.mark.parametrize("dropped", [(), (3,), (2, 4)])
def test_a_mask_expanded_at_the_directory_equals_one_expanded_from_scratch(
    monkeypatch: pytest.MonkeyPatch, dropped: tuple[int, ...]
) -> None:
    """Peers that drop out between the directory and the relayed shares are taken out of
    the mask expanded ahead: the masked input is bit-identical to one masked from scratch."""
    ahead = _masked(monkeypatch, ahead=True, dropped=dropped)
    scratch = _masked(monkeypatch, ahead=False, dropped=dropped)
    assert ahead.tobytes() == scratch.tobytes()


def test_control_the_mask_depends_on_the_survivors_the_shares_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positive control: the same draws with another set of survivors give another mask, and
    a mask expanded ahead then uncorrected (no dropout taken out) would differ too."""
    scratch = _masked(monkeypatch, ahead=False, dropped=(3,))
    assert _masked(monkeypatch, ahead=True, dropped=(4,)).tobytes() != scratch.tobytes()
    assert _masked(monkeypatch, ahead=True, dropped=()).tobytes() != scratch.tobytes()
