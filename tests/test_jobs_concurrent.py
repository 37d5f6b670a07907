"""A worker takes several jobs' training tasks at once when its owner allows it (issue 24,
``[jobs] max-tasks``): the policy key, the coordinator's selection (capped, one task per job,
one-shot unchanged), bytes per job with two tasks in flight, the ledger under concurrent
charges, and two secure jobs summing exactly on the same three workers at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from standing_network import Silo, standing_network, until_final
from test_coordinator import MODEL, TIMEOUT, ScriptedTrainer, config, run_worker
from test_job_secagg import SECURE

from fedcore.errors import PolicyError
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.policy import Charge, PrivacyLedger, epsilon_of, parse_policy
from fedcore.protocol import SECAGG_CAPABILITY
from fedcore.server.jobs.workers import JobWorkers
from fedcore.server.network import Network
from fedcore.server.state.registry import (
    MAX_TASKS_PER_WORKER,
    IllegalTransition,
    Ticket,
    WorkerRegistry,
    WorkerSession,
)
from fedcore.server.transport.traffic import StreamJobs
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights
from fedcore.worker.trainer import FitOutput

# ---------------------------------------------------------------- the owner's policy


def test_max_tasks_defaults_to_one_and_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    assert parse_policy({}, path).max_tasks == 1
    policy = parse_policy({"jobs": {"max-tasks": 3}}, path)
    assert policy.max_tasks == 3
    assert "up to 3 tasks of different jobs at once" in policy.describe()
    for bad in (0, 65, "2"):
        with pytest.raises(PolicyError, match="max-tasks"):
            parse_policy({"jobs": {"max-tasks": bad}}, path)


# ---------------------------------------------------------------- the coordinator's selection


async def _join(registry: WorkerRegistry, name: str, max_tasks: int) -> WorkerSession:
    hello = pb.Hello(
        name=name, num_examples=10, capabilities=["fit", SECAGG_CAPABILITY], max_tasks=max_tasks
    )
    session = registry.new_session(hello, "peer", None)
    await registry.activate(session)
    return session


def _give(session: WorkerSession, job: str, task_id: str) -> None:
    session.assign(Ticket(task_id, 1, pb.TASK_KIND_FIT, session, job_id=job))


async def test_a_job_is_offered_workers_with_room_and_never_two_of_its_own_tasks() -> None:
    registry = WorkerRegistry()
    one = await _join(registry, "one", 0)  # an older worker announces nothing: one task
    two = await _join(registry, "two", 2)
    many = await _join(registry, "many", 10**6)  # a claim; the coordinator caps it
    assert (one.max_tasks, two.max_tasks, many.max_tasks) == (1, 2, MAX_TASKS_PER_WORKER)
    a, b, c = (JobWorkers(registry, job_id=j) for j in ("a", "b", "c"))

    def names(pool: JobWorkers) -> list[str]:
        return sorted(s.name for s in pool.idle())

    assert names(a) == ["many", "one", "two"]  # positive control: all idle

    for session in (one, two, many):
        _give(session, "a", f"{session.name}-a")
    assert names(a) == []  # never a second task of job a on any worker
    assert names(b) == ["many", "two"]  # room left where the owner allows more
    assert registry.idle() == []  # a one-shot round still waits for IDLE workers
    with pytest.raises(IllegalTransition):
        _give(two, "a", "two-a2")
    _give(two, "b", "two-b")
    assert names(c) == ["many"]  # "two" is full
    with pytest.raises(IllegalTransition):
        _give(two, "c", "two-c")
    for i in range(MAX_TASKS_PER_WORKER - 1):
        _give(many, f"job{i}", f"many-{i}")
    assert names(JobWorkers(registry, job_id="z")) == []  # capped, whatever it claimed

    # An answer frees a place at once, and wakes whoever waits for workers.
    waiting = asyncio.create_task(c.wait_for_idle(1, TIMEOUT))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert two.finish_ticket("two-a") is not None
    assert await asyncio.wait_for(waiting, TIMEOUT)
    assert names(c) == ["two"]
    assert names(a) == ["two"]
    two.finish_ticket("two-b")
    assert registry.idle() == [two]  # holding nothing: IDLE again

    # A worker that leaves fails every task it held.
    held = list(many.tickets.values())
    many.close("gone")
    assert all(isinstance(t.future.result(), ConnectionError) for t in held)


def test_bytes_of_two_tasks_in_flight_are_counted_to_their_own_jobs() -> None:
    jobs = StreamJobs()
    for task_id, job in (("ta", "a"), ("tb", "b")):
        assert jobs.outgoing(pb.CoordinatorMessage(task=pb.Task(task_id=task_id, job_id=job)))
        assert jobs.payload() == job  # its weights follow it
    secure = pb.SecAggCoordinatorMessage(job_id="a")
    assert jobs.outgoing(pb.CoordinatorMessage(secagg=secure)) == "a"
    # Job b's answer comes first, then job a's upload: each counted to its own job.
    error = pb.WorkerMessage(error=pb.TaskError(task_id="tb"))
    assert jobs.incoming(error) == "b"
    assert jobs.incoming(pb.WorkerMessage(result=pb.TaskResult(task_id="ta"))) == "a"
    assert jobs.incoming(None) == "a"  # its chunks
    assert jobs.incoming(pb.WorkerMessage(secagg=pb.SecAggWorkerMessage(job_id="b"))) == "b"
    # A task it was never given, and a secure message for a job it holds none of: no job.
    assert jobs.incoming(pb.WorkerMessage(result=pb.TaskResult(task_id="tz"))) == ""
    assert jobs.incoming(pb.WorkerMessage(secagg=pb.SecAggWorkerMessage(job_id="x"))) == ""


# ---------------------------------------------------------------- the worker's own count


async def test_a_worker_slow_to_resume_after_its_answer_is_given_its_next_task(
    coordinator_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An honest coordinator sends a worker its next task the moment the last answer
    arrives; the worker may read it before its own write call returns. The task's slot is
    free by then, so a one-shot federation is never refused by its own workers."""
    from fedcore.worker.stream import JoinStream

    original = JoinStream.write

    async def resumes_late(self: JoinStream, message: pb.WorkerMessage | bytes) -> None:
        await original(self, message)
        await asyncio.sleep(0.05)  # the fault: the reader runs before this write returns

    monkeypatch.setattr(JoinStream, "write", resumes_late)
    coordinator, task = await coordinator_factory(config(rounds=3, min_workers=1, fed_eval_every=1))
    worker = await run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 30))
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [r.workers for r in result.rounds] == [1, 1, 1]
    assert worker.tasks_refused == 0


# ---------------------------------------------------------------- the worker's ledger


def test_concurrent_charges_neither_overspend_nor_get_lost(tmp_path: Path) -> None:
    """Two jobs' tasks charge the silo's ledger from two threads at once."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", study="s")
    charge = [Charge(noise_multiplier=4.0)]
    budget = epsilon_of(charge * 10, delta=1e-5) + 1e-9  # room for exactly 10 charges
    with ThreadPoolExecutor(8) as pool:
        spent = list(pool.map(lambda _: ledger.spend(charge, delta=1e-5, budget=budget), range(24)))
    accepted = [s for s in spent if s is not None]
    assert len(accepted) == 10  # none lost (a lost write would let an 11th in)
    assert len(ledger.charges()) == 10
    assert ledger.epsilon(delta=1e-5) <= budget


def test_two_jobs_masking_near_identical_models_at_once_are_not_both_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The participation record refuses a second masked input over (nearly) the same model;
    two jobs' tasks admit from two threads at once, and the check and its record must be one
    step. The fault: each thread waits for the other between its check and its record."""
    import fedcore.secagg.participation as participation
    from fedcore.errors import SecAggRefusedError
    from fedcore.secagg import SecAggParams
    from fedcore.secagg.setup import make_setup

    both = threading.Barrier(2, timeout=1.0)
    entry = participation._Entry

    def checked_then_meet(*args: Any) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait()  # under the record's lock the other thread cannot get here: times out
        return entry(*args)

    monkeypatch.setattr(participation, "_Entry", checked_then_meet)
    record = participation.ParticipationLog(tmp_path / "p.json", min_distance=1e-4)
    model = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    setups = [make_setup(SecAggParams(job=job), 3, 10) for job in ("a", "b")]

    def admit(setup: Any) -> str:
        try:
            record.admit(setup, model, distributed_dp=False)
        except SecAggRefusedError:
            return "refused"
        return "admitted"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(admit, setups))
    assert outcomes == ["admitted", "refused"]
    monkeypatch.undo()
    assert len(participation.ParticipationLog(tmp_path / "p.json", min_distance=1e-4)) == 1


# ---------------------------------------------------------------- the worker's trainer


def test_two_tasks_training_at_once_each_train_their_own_model() -> None:
    """The trainer keeps one model for the next task; a task that trains meanwhile gets its
    own copy, or one task's weights would be loaded into the other's model mid-training."""
    from fedcore.data import ArrayDataset
    from fedcore.training import TrainResult
    from fedcore.worker import TorchTrainer

    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def together(net: Any, data: Any, config: TrainConfig, device: Any) -> TrainResult:
        barrier.wait()  # both tasks have loaded their weights: now "train" (change nothing)
        return TrainResult(num_examples=4, loss=0.0, accuracy=0.0, seconds=0.0)

    spec = ModelSpec("logreg")
    trainer = TorchTrainer(
        ArrayDataset(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)),
        model=spec,
        train_fn=together,
    )
    base = get_weights(build_model(spec, seed=0))
    sent = [{k: v + np.float32(i) for k, v in base.items()} for i in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        fits = list(pool.map(lambda w: trainer.fit(spec, w, TrainConfig()), sent))
    for weights, fit in zip(sent, fits, strict=True):
        for name, array in weights.items():
            np.testing.assert_array_equal(fit.weights[name], array)
    # Alone, a task trains the kept model as before.
    barrier = threading.Barrier(1)
    alone = trainer.fit(spec, sent[0], TrainConfig())
    np.testing.assert_array_equal(alone.weights["linear.bias"], sent[0]["linear.bias"])


# ---------------------------------------------------------------- two secure jobs, same workers


class _Together(ScriptedTrainer):
    """Trains only while the other job's task trains too: a barrier across the worker's
    task threads, which breaks (and fails the task) when they take turns instead."""

    concurrent = True

    def __init__(self, offset: float, examples: int) -> None:
        super().__init__(offset, examples)
        self.barrier = threading.Barrier(2, timeout=TIMEOUT)

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        self.barrier.wait()
        return super().fit(model, weights, config)


def _silos(trainers: Sequence[ScriptedTrainer]) -> list[Silo]:
    """One worker per trainer, each allowed two tasks at once."""
    return [Silo(f"silo{i}", t, ("s",), max_tasks=2) for i, t in enumerate(trainers)]


def _submit(network: Network, settings: dict[str, Any], seeds: tuple[int, ...]) -> list[str]:
    jobs = [
        network.store.submit(
            study="s",
            scientist="alice",
            kind="train",
            settings={**settings, "seed": seed},
            rounds=1,
        ).id
        for seed in seeds
    ]
    network.scheduler.wake()
    return jobs


async def test_two_secure_jobs_share_three_workers_at_once_and_each_sums_exactly(
    tmp_path: Path,
) -> None:
    scripted = [(1.0, 30), (-0.5, 10), (2.0, 20)]
    async with standing_network(
        tmp_path, _silos([_Together(o, n) for o, n in scripted])
    ) as network:
        # Different initial models: a worker sends one masked update per global model
        # (secure-aggregation.once-per-model), whichever job asks.
        seeds = (1, 2)
        jobs = _submit(network, SECURE, seeds)
        await until_final(network, jobs)
        step = 4.0 / (2**23 - 1)
        mean = sum(o * n for o, n in scripted) / sum(n for _, n in scripted)
        for job, seed in zip(jobs, seeds, strict=True):
            record = network.store.get(job)
            assert record.state == "completed", record.message
            model = load_file(tmp_path / "state" / "jobs" / job / "model.safetensors")
            for name, w0 in get_weights(build_model(MODEL, seed=seed)).items():
                np.testing.assert_allclose(model[name], w0 + mean, rtol=0, atol=4 * step)


class _Counting(ScriptedTrainer):
    """Counts the fits running at once (each lasts a while, so two tasks would overlap)."""

    def __init__(self, offset: float, examples: int) -> None:
        super().__init__(offset, examples)
        self.running = self.peak = 0
        self._lock = threading.Lock()

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.2)  # a long fit: the window in which another task's would overlap
            return super().fit(model, weights, config)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("concurrent", [False, True])
async def test_a_trainer_that_is_not_concurrent_is_called_one_task_at_a_time(
    tmp_path: Path, concurrent: bool
) -> None:
    trainers = [_Counting(1.0, 10) for _ in range(3)]
    for trainer in trainers:
        trainer.concurrent = concurrent
    async with standing_network(tmp_path, _silos(trainers)) as network:
        jobs = _submit(network, {"rounds": 1, "min_workers": 3}, (1, 2))
        await until_final(network, jobs)
        assert all(network.store.get(j).state == "completed" for j in jobs)
    # Both jobs' tasks were held at once either way; only a concurrent trainer overlapped.
    peaks = [t.peak for t in trainers]
    assert max(peaks) == 2 if concurrent else peaks == [1, 1, 1], peaks
