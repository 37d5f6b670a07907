"""Secure aggregation routed by job id (issue 24): two securely aggregated jobs run at once on
a standing network (in process, real gRPC) and each sums exactly its own workers' updates; a
worker's secure message naming another job is refused; the worker keeps a round per job."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from standing_network import Silo, standing_network, until_final
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights
from test_job_traffic import _Context

from fedcore.data.metadata import DatasetMetadata
from fedcore.errors import SecAggError
from fedcore.protocol import PROTOCOL_VERSION, STREAM_END
from fedcore.server.state.analytics import AnalyticsSettings
from fedcore.server.state.registry import SessionState, WorkerRegistry
from fedcore.server.transport.auth import Authenticator
from fedcore.server.transport.inbox import SecAggRoute
from fedcore.server.transport.service import CoordinatorService
from fedcore.v1 import fedcore_pb2 as pb

SECURE = {"rounds": 1, "min_workers": 3, "secagg": True, "secagg_clip": 4.0, "secagg_bits": 24}


async def test_two_secure_jobs_run_at_once_and_each_sums_its_own_workers(tmp_path: Path) -> None:
    offsets = {"a": [(1.0, 30), (-0.5, 10), (2.0, 20)], "b": [(3.0, 5), (0.5, 15), (-1.0, 10)]}
    silos = [
        Silo(f"{tag}{i}", ScriptedTrainer(offset, examples), (tag,))
        for tag, scripted in offsets.items()
        for i, (offset, examples) in enumerate(scripted)
    ]
    async with standing_network(tmp_path, silos) as network:
        jobs = [
            network.store.submit(
                study="s",
                scientist="alice",
                kind="train",
                settings={**SECURE, "require_tags": [tag]},
                rounds=1,
            ).id
            for tag in offsets
        ]
        network.scheduler.wake()
        await until_final(network, jobs)
        step = 4.0 / (2**23 - 1)
        for job, scripted in zip(jobs, offsets.values(), strict=True):
            record = network.store.get(job)
            assert record.state == "completed", record.message
            mean = sum(o * n for o, n in scripted) / sum(n for _, n in scripted)
            model = load_file(tmp_path / "state" / "jobs" / job / "model.safetensors")
            for name, w0 in initial_weights().items():
                np.testing.assert_allclose(model[name], w0 + mean, rtol=0, atol=4 * step)
        # They ran at once: each job started its rounds before the other one ended.
        lines = {j: network.store.events(j, 0) for j in jobs}
        started = [next(e.seq for e in lines[j] if "running rounds" in e.text) for j in jobs]
        ended = [next(e.seq for e in lines[j] if e.text.startswith("completed")) for j in jobs]
        assert max(started) < min(ended), lines


async def test_a_secure_message_naming_another_job_is_refused() -> None:
    registry = WorkerRegistry()
    service = CoordinatorService(
        config(), registry, None, (), Authenticator(None, mutual_tls=False)
    )
    heard: dict[str, list[str]] = {"job-a": [], "job-b": []}

    def hear(names: list[str]) -> SecAggRoute:
        return lambda session, message: names.append(session.name)

    for job, names in heard.items():
        service.route_secagg(job, hear(names))
    stream = _Context()
    join = asyncio.create_task(service.join(None, stream))  # type: ignore[arg-type]
    hello = pb.Hello(name="silo-0", protocol_version=PROTOCOL_VERSION, num_examples=10)
    stream.push(pb.WorkerMessage(hello=hello))
    await stream.until(lambda: registry.by_name("silo-0") is not None, "the worker joined")
    session = registry.by_name("silo-0")
    assert session is not None
    await stream.until(lambda: session.state is SessionState.IDLE, "the session is active")
    session.send(pb.CoordinatorMessage(task=pb.Task(task_id="t", job_id="job-a")))
    await stream.until(lambda: len(stream.written) == 2, "the task is written")

    def keys(job: str) -> pb.WorkerMessage:
        return pb.WorkerMessage(
            secagg=pb.SecAggWorkerMessage(keys=pb.SecAggKeys(round_id="r"), job_id=job)
        )

    # Positive control: its own job's message reaches that job's round.
    stream.push(keys("job-a"))
    await stream.until(lambda: heard["job-a"] == ["silo-0"], "job a's round heard it")
    # The attack: a message naming job b, whose round runs but which gave it no task.
    stream.push(keys("job-b"))
    stream.push(pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=1)))
    await stream.until(lambda: stream.idle, "every message handled")
    assert heard == {"job-a": ["silo-0"], "job-b": []}
    # After job a's end the worker holds no task of it: its late messages are refused too.
    session.send(pb.CoordinatorMessage(job_end=pb.JobEnd(job_id="job-a")))
    await stream.until(lambda: len(stream.written) == 3, "the job end is written")
    stream.push(keys("job-a"))
    stream.push(pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=2)))
    await stream.until(lambda: stream.idle, "every message handled")
    assert heard["job-a"] == ["silo-0"]
    stream.push(STREAM_END)
    await asyncio.wait_for(join, 10)


async def test_an_analytics_message_naming_a_job_it_was_not_asked_for_is_refused() -> None:
    registry = WorkerRegistry()
    service = CoordinatorService(
        config(), registry, None, (), Authenticator(None, mutual_tls=False)
    )
    heard: list[str] = []
    service.analytics_handler = lambda session, message: heard.append(message.job_id)
    stream = _Context()
    join = asyncio.create_task(service.join(None, stream))  # type: ignore[arg-type]
    hello = pb.Hello(name="silo-0", protocol_version=PROTOCOL_VERSION, num_examples=10)
    stream.push(pb.WorkerMessage(hello=hello))
    await stream.until(lambda: registry.by_name("silo-0") is not None, "the worker joined")
    session = registry.by_name("silo-0")
    assert session is not None
    await stream.until(lambda: session.state is SessionState.IDLE, "the session is active")
    ask = pb.AnalyticsCoordinatorMessage(
        task=pb.QueryTask(query_id="q", job_id="q-a"), job_id="q-a"
    )
    session.send_urgent(pb.CoordinatorMessage(analytics=ask))
    await stream.until(lambda: len(stream.written) == 2, "the query is written")

    def accept(job: str) -> pb.WorkerMessage:
        body = pb.AnalyticsWorkerMessage(accept=pb.QueryAccept(query_id="q"), job_id=job)
        return pb.WorkerMessage(analytics=body)

    stream.push(accept("q-a"))  # positive control: the query it was asked
    stream.push(accept("q-b"))  # the attack: another job's query, never asked of it
    await stream.until(lambda: stream.idle, "every message handled")
    assert heard == ["q-a"]
    stream.push(STREAM_END)
    await asyncio.wait_for(join, 10)


async def test_a_worker_keeps_a_secure_round_per_job() -> None:
    """Job a's round survives job b's task on the same worker (it may still be unmasking);
    each coordinator message reaches only the round of the job it names, and the worker's
    own messages name their job."""
    from fedcore.secagg import SecAggParams, wire
    from fedcore.secagg.setup import make_setup
    from fedcore.worker.secagg import SecAggRounds

    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    rounds = SecAggRounds(send, "silo-0")
    params = {job: SecAggParams(job=job, phase_timeout=0.1) for job in ("job-a", "job-b")}
    setups = {job: make_setup(p, 3, 30) for job, p in params.items()}
    tasks = {
        job: pb.Task(round=1, job_id=job, secagg=wire.setup_to_proto(setup))
        for job, setup in setups.items()
    }
    for task in tasks.values():
        await rounds.start(task)
    assert [m.secagg.job_id for m in sent] == ["job-a", "job-b"]
    assert all(m.secagg.WhichOneof("body") == "keys" for m in sent)  # nobody gave up

    def abort(round_of: str, named: str, reason: str) -> pb.SecAggCoordinatorMessage:
        body = pb.SecAggAbort(round_id=setups[round_of].round_id, reason=reason)
        return pb.SecAggCoordinatorMessage(abort=body, job_id=named)

    # The attack: job a's round's abort, named for job b, never reaches job a's round.
    await rounds.handle(abort("job-a", "job-b", "forged"))
    # Positive control: job b's own abort, named for job b, ends job b's round at once.
    await rounds.handle(abort("job-b", "job-b", "b is over"))
    weights = {"w": np.zeros(8, np.float32)}
    with pytest.raises(SecAggError, match="b is over"):
        await rounds.mask(tasks["job-b"], weights, weights, is_delta=False, examples=10)
    # Job a's round was alive: it waited for its shares (none come here) and gave up on time.
    with pytest.raises(SecAggError, match="no shares arrived in time") as late:
        await rounds.mask(tasks["job-a"], weights, weights, is_delta=False, examples=10)
    assert "forged" not in str(late.value)
    assert sent[-1].secagg.job_id == "job-a"


class _Registry:
    """The frontend's view of the connected silos (in memory)."""

    def __init__(self, silos: list[Any]) -> None:
        self._silos = silos

    def sessions(self) -> list[Any]:
        return self._silos

    def by_name(self, name: str) -> Any:
        return next((s for s in self._silos if s.name == name), None)


async def test_two_query_jobs_run_at_once_each_round_hearing_its_own_job(
    tmp_path: Path,
) -> None:
    from test_analytics_rounds import FEATURES, _Silo, _silo

    from fedcore.protocol import ANALYTICS_CAPABILITY
    from fedcore.server.analytics.frontend import AnalyticsFrontend
    from fedcore.server.analytics.rounds import QueryOrigin

    rng = np.random.default_rng(6)
    parts = [rng.uniform(20, 90, 40) for _ in range(3)]
    # Test doubles of sessions: given below the attributes the analytics route reads.
    silos: list[Any] = [
        _Silo(f"silo-{i}", _silo(tmp_path, i, ages, budget=50.0)) for i, ages in enumerate(parts)
    ]
    frontend = AnalyticsFrontend(
        AnalyticsSettings(tmp_path / "scientists.json", phase_timeout=20.0),
        _Registry(silos),  # type: ignore[arg-type]
    )
    seen: list[str] = []

    def deliver(session: Any, message: pb.AnalyticsWorkerMessage) -> None:
        seen.append(message.job_id)
        frontend.route(session, message)  # routed by the job the message names

    for s in silos:
        s.capabilities = (ANALYTICS_CAPABILITY,)
        s.dataset = DatasetMetadata(s.name, features=FEATURES)
        s.round = SimpleNamespace(on_message=deliver)
    try:
        answers = await asyncio.wait_for(
            asyncio.gather(
                frontend.query("count()", epsilon=0.5, origin=QueryOrigin("job-1", "a", "s")),
                frontend.query("count()", epsilon=0.5, origin=QueryOrigin("job-2", "b", "s")),
            ),
            TIMEOUT,
        )
    finally:
        for s in silos:
            s.pump.cancel()
    truth = sum(len(p) for p in parts)
    for answer in answers:
        (cell,) = answer.cells
        assert abs(cell.value - truth) < 6 * cell.std_error + 1
    # The two rounds ran at once: job 2's messages came before job 1's last one.
    assert seen.index("job-2") < len(seen) - 1 - seen[::-1].index("job-1")
    # Both were answered (each silo charged twice), neither round took the other's messages.
    for s in silos:
        assert len(s.responder._gate.guard.ledger.charges()) == 2
