"""The round engine in-process: the registry wakes waiters on every session transition (a
straggler is available to the next round at once), declared strategy capabilities decide
whether evaluation overlaps training (with differential privacy too), and client-level DP warns
at start when its noise would drown the model."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, run_worker

from fedcore.data import save_shard
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.privacy import DifferentialPrivacy
from fedcore.server import Coordinator
from fedcore.server.engine.evaluation import CentralEvaluator
from fedcore.server.state.noise_check import weights_rms
from fedcore.server.state.privacy import DPSettings
from fedcore.server.state.registry import SessionState, Ticket, WorkerRegistry
from fedcore.strategy import FedAvg
from fedcore.training import EvalResult
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights


def _busy_session(registry: WorkerRegistry) -> tuple[Any, Ticket]:
    session = registry.new_session(pb.Hello(name="straggler", num_examples=1), "peer")
    session.transition(SessionState.IDLE)
    ticket = Ticket("t1", 1, pb.TASK_KIND_FIT, session)
    session.assign(ticket)
    return session, ticket


async def test_a_straggler_finishing_after_its_deadline_wakes_wait_for_idle_at_once() -> None:
    registry = WorkerRegistry()
    session, _ = _busy_session(registry)
    waiting = asyncio.create_task(registry.wait_for_idle(1, timeout=TIMEOUT))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # control: a BUSY worker is not idle
    started = time.perf_counter()
    session.finish_ticket("t1")  # its late result arrived: BUSY -> IDLE, nothing else happens
    assert await asyncio.wait_for(waiting, 5) is True
    assert time.perf_counter() - started < 5
    assert registry.idle() == [session]


async def test_every_session_transition_counts_as_a_registry_change() -> None:
    registry = WorkerRegistry()
    seen = registry.changes
    session, _ = _busy_session(registry)  # JOINING -> IDLE -> BUSY
    assert registry.changes == seen + 2
    waiter = asyncio.create_task(registry.wait_for_change(registry.changes))
    await asyncio.sleep(0)
    assert not waiter.done()
    session.close("gone")  # BUSY -> CLOSED
    await asyncio.wait_for(waiter, 5)


def _eval_shard(tmp_path: Path) -> Path:
    path = tmp_path / "eval.npz"
    rng = np.random.default_rng(0)
    save_shard(path, rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    return path


class SecondRoundTrainer(ScriptedTrainer):
    """Sets ``second_fit`` when it starts training round 2."""

    def __init__(self, offset: float, examples: int, second_fit: threading.Event) -> None:
        super().__init__(offset, examples)
        self.second_fit = second_fit

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> Any:
        if self.rounds_seen == 1:
            self.second_fit.set()
        return super().fit(model, weights, config)


class StopsEarly(FedAvg):
    may_stop_early = True


@pytest.mark.parametrize("overlaps", [True, False], ids=["overlapping", "may-stop-early"])
async def test_evaluation_overlaps_training_under_differential_privacy(
    coordinator_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlaps: bool
) -> None:
    """Round 1's centralized evaluation waits until round 2's training has started: only a
    round engine that overlaps them gets there. A strategy that may stop early (DP passes the
    capability through) sees each evaluation before the next round starts."""
    second_fit = threading.Event()
    overlapped: list[bool] = []

    def evaluate(self: CentralEvaluator, weights: Weights) -> EvalResult:
        if not overlapped:
            # Bounded: without overlap round 2 cannot start while this runs.
            overlapped.append(second_fit.wait(TIMEOUT if overlaps else 1.0))
        return EvalResult(loss=1.0, accuracy=0.5, num_examples=20)

    monkeypatch.setattr(CentralEvaluator, "evaluate", evaluate)
    inner = FedAvg() if overlaps else StopsEarly()
    dp = DifferentialPrivacy(inner, noise_multiplier=1e-6, clipping_norm=100.0, min_updates=2)
    assert dp.may_stop_early is not overlaps
    coordinator, task = await coordinator_factory(
        config(rounds=2, eval_data=_eval_shard(tmp_path), min_results=2), strategy=dp
    )
    await asyncio.gather(
        run_worker(coordinator.port, "a", SecondRoundTrainer(0.01, 10, second_fit)),
        run_worker(coordinator.port, "b", SecondRoundTrainer(0.01, 10, second_fit)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [r.round for r in result.rounds] == [1, 2]
    assert overlapped == [overlaps]
    assert all(r.epsilon is not None for r in result.rounds)


@pytest.mark.parametrize(("noise", "warned"), [(3.0, True), (0.001, False)])
def test_client_level_dp_warns_at_start_when_the_noise_drowns_the_model(
    caplog: pytest.LogCaptureFixture, noise: float, warned: bool
) -> None:
    """The issue's foot-gun: z = 3, C = 1, 3 workers adds std 1.0 to every coordinate of the
    average each round, ~38x the RMS of mnist-mlp's initial weights (NaN by round 3)."""
    caplog.set_level(logging.INFO, "fedcore.server")
    settings = DPSettings(noise_multiplier=noise, clip=1.0)
    Coordinator(config(model=ModelSpec("mnist-mlp"), min_workers=3, dp=settings))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        (message,) = warnings
        assert "noise of std 1 to every coordinate" in message
        assert "(noise multiplier 3 x clip 1 / 3 updates)" in message
        assert "record-level DP-SGD" in message
    else:
        assert warnings == []
        assert any("noise std 0.000333 per coordinate" in r.getMessage() for r in caplog.records)


def test_weights_rms_counts_floating_point_coordinates_only() -> None:
    weights: Weights = {
        "w": np.array([3.0, -4.0], np.float32),
        "b": np.zeros(2, np.float64),
        "n": np.array([100], np.int64),
    }
    assert weights_rms(weights) == pytest.approx(math.sqrt(25 / 4))


async def test_a_worker_leaving_before_dispatch_never_lowers_min_results(
    coordinator_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wait_for_idle saw 3 idle workers, then one left before the round was dispatched (the
    waiter wakes some loop iterations after the check): the round must wait for 3 again, not
    run with the 2 left, since a round needs no more results than it issued tasks."""
    original = WorkerRegistry.wait_for_idle
    calls: list[int] = []
    gone: list[Any] = []

    async def racing(self: WorkerRegistry, count: int, timeout: float | None) -> bool:
        if gone:
            gone.pop().missing_tags = ()  # it is back for the next attempt
        ok = await original(self, count, timeout)
        calls.append(count)
        if len(calls) == 2:  # 1: the coordinator's wait for joiners; 2: round 1's
            gone.append(self.idle()[0])
            gone[0].missing_tags = ("left",)  # unselectable, as if it had left
        return ok

    monkeypatch.setattr(WorkerRegistry, "wait_for_idle", racing)
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=3, min_results=3))
    await asyncio.gather(
        *(run_worker(coordinator.port, name, ScriptedTrainer(0.01, 10)) for name in "abc")
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    # Before the fix: [(2, 1)], a round of 2 results under --min-results 3.
    assert [(r.workers, r.attempts) for r in result.rounds] == [(3, 2)]
    assert calls == [3, 3, 3]  # the race was staged once, then the round waited again
