"""``[jobs] max-tasks``: a real ``fed-worker`` holds no more tasks than its owner allows,
whatever a (scripted, hostile) coordinator sends it.

A secure task is *held* while the worker waits for its peers' directory, which the scripted
coordinator never sends: each case first holds such a task, then sends more. The positive
control is the worker allowed two tasks running another job's task to completion meanwhile.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import CHUNK, Session, fit_task, hostile_coordinator

from fedcore.codec import PayloadAssembler, make_header
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec
from fedcore.secagg import SecAggParams
from fedcore.secagg.setup import make_setup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

pytestmark = pytest.mark.slow

RULE = "[jobs.max-tasks]"


def _logreg() -> Weights:
    return get_weights(build_model(ModelSpec("logreg"), seed=0))


def _task(job: str, *, secure: bool = False) -> pb.Task:
    setup = make_setup(SecAggParams(clip=4.0), 3, 400) if secure else None
    task = fit_task(secagg=setup)
    task.job_id = job
    return task


async def _hold(session: Session, job: str, weights: Weights) -> str:
    """Send a secure task of ``job`` and wait until the worker holds it (its keys came)."""
    task_id = await session.send_task(_task(job, secure=True), weights)
    keys = await session.next_secagg("keys")
    assert keys is not None
    return task_id


async def _refused(session: Session, job: str, weights: Weights) -> str:
    message = await session.refusal(await session.send_task(_task(job), weights))
    assert RULE in message, message
    return message


async def _shutdown(session: Session, worker: Proc) -> None:
    await session.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output


async def test_a_worker_refuses_tasks_beyond_its_owners_bound_and_runs_those_within_at_once(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[jobs]\nmax-tasks = 2\n")
    async with hostile_coordinator() as (coordinator, port):
        two = start_worker(procs, port, shards / "shard-0.npz", "two", "--policy", str(policy))
        one = start_worker(procs, port, shards / "shard-1.npz", "one")
        s2, s1 = await asyncio.wait_for(
            asyncio.gather(coordinator.session_of("two"), coordinator.session_of("one")), 90
        )
        assert s2.hello.max_tasks == 2  # announced, so an honest coordinator can respect it
        assert s1.hello.max_tasks == 1
        w0 = _logreg()

        # Positive control: allowed two, the worker runs job b's task to its end while it
        # holds job a's.
        await _hold(s2, "a", w0)
        result, update = await s2.outcome(await s2.send_task(_task("b"), w0))
        assert isinstance(result, pb.TaskResult), result
        assert result.num_examples == 400
        assert not np.array_equal(update["linear.bias"], w0["linear.bias"])

        # Attack 1: a second task of a job it still runs (its secure round is per job).
        assert "still running" in await _refused(s2, "a", w0)
        # Attack 2: a third task while it holds two (job a's, and now job b's next one).
        # (Another global model: a silo masks one update per model, whichever job asks.)
        await _hold(s2, "b", {k: v + np.float32(0.1) for k, v in w0.items()})
        assert "limit ([jobs] max-tasks = 2)" in await _refused(s2, "c", w0)

        # The default (one task): another job's task is refused while one is held, instead
        # of waiting in a queue behind it.
        await _hold(s1, "a", w0)
        assert "limit ([jobs] max-tasks = 1)" in await _refused(s1, "b", w0)

        await _shutdown(s2, two)
        await _shutdown(s1, one)


async def test_two_tasks_uploads_leave_whole_and_a_task_amid_anothers_payload_is_refused(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[jobs]\nmax-tasks = 2\n")
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(procs, port, shards / "shard-0.npz", "two", "--policy", str(policy))
        s = await asyncio.wait_for(coordinator.session_of("two"), 90)
        w0 = get_weights(build_model(ModelSpec("mnist-mlp"), seed=0))  # ~7 chunks an update
        sent = {}
        for job in ("a", "b"):
            task = fit_task("mnist-mlp")
            task.job_id = job
            sent[await s.send_task(task, w0)] = job
        # Both train at once; each result is followed by all of its chunks, nothing between
        # but heartbeats (a result amid another upload would break the coordinator's read).
        done: set[str] = set()
        while len(done) < 2:
            message = await s.next()
            assert message.WhichOneof("body") == "result", message
            result = message.result
            assembler = PayloadAssembler(result.update, max_bytes=1 << 30, max_chunk_bytes=CHUNK)
            assert assembler.expected_chunks > 1
            while not assembler.complete:
                chunk = await s.next()
                assert chunk.WhichOneof("body") == "chunk", chunk
                assembler.add(chunk.chunk)
            assert set(assembler.weights()) == set(w0)
            done.add(sent[result.task_id])
        assert done == {"a", "b"}

        # A coordinator that starts a task amid another's payload: the worker reads no
        # further on that stream (it cannot tell whose chunks follow) and reconnects.
        reconnect: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        coordinator.sessions["two"] = reconnect  # the next stream's session lands here
        first = _task("c")
        first.weights.CopyFrom(make_header(_logreg(), CHUNK // 8))  # 4+ chunks, none sent
        await s.send(pb.CoordinatorMessage(task=first))
        await s.send_task(_task("d"), _logreg())
        await asyncio.to_thread(
            worker.wait_for_event, "not_connected", reason=re.compile("amid another"), timeout=60
        )
        again = await asyncio.wait_for(reconnect, 90)
        await _shutdown(again, worker)
