"""A real ``fed-worker`` against a hostile coordinator (tests/hostile.py) shipping plans:
only approved state leaves, the silo's data stays as it is, and approval binds the terms.

Each test shows the honest case first through the same harness (the positive control)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_worker
from hostile import Session, hostile_coordinator
from plan_models import BatchNormNet, MemoryHog, OverwritesInput, RowInBuffer, plan_of

from fedcore.data.shards import load_shard
from fedcore.plan import TrainConfig
from fedcore.plans import Plan
from fedcore.plans.queue import RequestQueue
from fedcore.v1 import fedcore_pb2 as pb

pytestmark = pytest.mark.slow


def _task(plan: Plan, kind: pb.TaskKind.ValueType = pb.TASK_KIND_FIT, **train: object) -> pb.Task:
    task = pb.Task(round=1, kind=kind, model=pb.ModelSpec(name=plan.model_name), plan=plan.program)
    if kind == pb.TASK_KIND_FIT:
        config = {"epochs": 1, "batch_size": 50, "learning_rate": 0.05, **train}
        task.train.CopyFrom(TrainConfig(**config).to_proto())  # type: ignore[arg-type]
    return task


async def _run(
    session: Session, task: pb.Task, plan: Plan
) -> tuple[pb.TaskResult, dict[str, np.ndarray]]:
    outcome, update = await session.outcome(await session.send_task(task, plan.weights))
    assert isinstance(outcome, pb.TaskResult), outcome
    return outcome, update


async def _refusal(session: Session, task: pb.Task, plan: Plan) -> str:
    return await session.refusal(await session.send_task(task, plan.weights))


async def test_only_approved_state_leaves_and_the_data_is_the_plans_to_read_only(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """Plans run in the worker's sandbox (the default), here with 256 MB to spare."""
    shard = shards / "shard-0.npz"
    rows = load_shard(shard).x.flatten(1).numpy()
    policy = tmp_path / "policy.toml"
    policy.write_text("[plans]\nsandbox-memory-bytes = 268_435_456\n")
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(
            procs, port, shard, "silo", "--policy", str(policy), "--give-up-after", "60"
        )
        s = await asyncio.wait_for(coordinator.session_of("silo"), 90)

        # Positive control: an honest batch-norm model's running statistics do come back.
        bn = plan_of(BatchNormNet())
        _, update = await _run(s, _task(bn), bn)
        assert not np.array_equal(update["norm.running_mean"], bn.weights["norm.running_mean"])
        assert not np.array_equal(update["norm.running_var"], bn.weights["norm.running_var"])

        # A buffer named like a statistic that the forward fills with a training row: it
        # goes back exactly as sent, the parameters still train.
        # (A verifier that refuses the plan keeps the row in too: nothing of it runs.)
        leak = plan_of(RowInBuffer(), verified=False)
        result, update = await s.outcome(await s.send_task(_task(leak), leak.weights))
        if isinstance(result, pb.TaskError):
            assert "[plans.verification]" in result.message, result
        else:
            assert np.array_equal(update["running_mean"], leak.weights["running_mean"])
            assert not np.array_equal(update["linear.weight"], leak.weights["linear.weight"])
            assert not any(np.allclose(update["running_mean"], r, atol=1e-4) for r in rows)

        # An evaluation forward that overwrites its input with 7s: the worker's data is
        # unchanged, so the next evaluation sees the same rows (and a training round between).
        overwrite = plan_of(OverwritesInput(), verified=False)
        evaluation = _task(overwrite, pb.TASK_KIND_EVALUATE)
        first, _ = await s.outcome(await s.send_task(evaluation, overwrite.weights))
        if isinstance(first, pb.TaskError):
            assert "[plans.verification]" in first.message, first
        else:
            assert first.num_examples == 400
            await _run(s, _task(overwrite), overwrite)
            second, _ = await _run(s, _task(overwrite, pb.TASK_KIND_EVALUATE), overwrite)
            assert dict(second.metrics) == dict(first.metrics)

        # A plan whose activations need 800 MB: its sandbox fails the task, the worker says
        # why and serves the next task (in a fresh sandbox).
        hog = plan_of(MemoryHog())
        failed, _ = await s.outcome(await s.send_task(_task(hog, batch_size=64), hog.weights))
        assert isinstance(failed, pb.TaskError), failed
        assert failed.code == pb.ERROR_CODE_TRAINING_FAILED
        assert "out of its sandbox's memory limit (268,435,456 bytes" in failed.message
        _, update = await _run(s, _task(bn), bn)
        assert not np.array_equal(update["norm.running_mean"], bn.weights["norm.running_mean"])

        await s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output


async def test_approval_binds_the_terms_and_the_queue_says_when_it_is_full(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[plans]\nrequire-approval = true\nrequests = "queue"\nmax-pending = 2\n')
    queue = RequestQueue(tmp_path / "queue")
    plan = plan_of(BatchNormNet())
    async with hostile_coordinator() as (coordinator, port):
        worker = start_worker(
            procs, port, shards / "shard-0.npz", "owner", "--policy", str(policy),
            "--give-up-after", "60",
        )  # fmt: skip
        s = await asyncio.wait_for(coordinator.session_of("owner"), 90)
        assert "awaiting approval" in await _refusal(s, _task(plan), plan)
        (request,) = queue.list()
        queue.decide(request.id, approve=True)
        await _run(s, _task(plan), plan)  # positive control: approved terms run

        # Terms the owner never saw (more epochs, smaller batches): each a new request.
        message = await _refusal(s, _task(plan, epochs=3), plan)
        assert "under other terms" in message
        assert "epochs 1 -> 3" in message
        (new,) = [r for r in queue.list() if r.id != request.id]
        assert new.id[:16] in message
        assert new.status == "pending"
        assert "batch_size 50 -> 1" in await _refusal(s, _task(plan, batch_size=1), plan)
        # Two requests await a decision: the queue is full, and says so.
        full = await _refusal(s, _task(plan, learning_rate=0.5), plan)
        assert "[plans.queue]" in full
        assert "2 requests await a decision" in full
        assert len(queue.list()) == 3
        await _run(s, _task(plan), plan)  # the approved terms still run

        await s.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason="test over")))
        assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output
