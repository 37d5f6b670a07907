"""Strategies inside the in-process coordinator: asynchronous FedBuff rounds, early stopping,
client sampling and robust aggregation, with scripted workers that make results exact."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.plan import ModelSpec, TrainConfig
from fedcore.strategy import ClientSampler, FedAvg, FedBuff, load_strategy
from fedcore.weights import Weights
from fedcore.worker import FitOutput


class OffsetTrainer(ScriptedTrainer):
    """Adds ``offset`` (reported as a metric, so each metrics row tells what it applied);
    the first fit can wait for ``wait_for`` with a different offset, and a fit can open
    ``opens`` once ``after`` fits are done (events bounded by the test timeout)."""

    def __init__(
        self,
        offset: float,
        *,
        first_offset: float | None = None,
        wait_for: threading.Event | None = None,
        opens: threading.Event | None = None,
        after: int = 0,
    ) -> None:
        super().__init__(offset, 10)
        self.first_offset = first_offset
        self.wait_for, self.opens, self.after = wait_for, opens, after

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        offset = self.offset
        if self.rounds_seen == 0 and self.wait_for is not None:
            assert self.wait_for.wait(TIMEOUT), "the gate never opened"
        if self.rounds_seen == 0 and self.first_offset is not None:
            offset = self.first_offset
        self.rounds_seen += 1
        if self.opens is not None and self.rounds_seen >= self.after:
            self.opens.set()
        updated = {k: v + np.asarray(offset, v.dtype) for k, v in weights.items()}
        return FitOutput(updated, self.examples, {"offset": offset})


async def test_fedbuff_moves_by_the_mean_offset_of_each_buffer(coordinator_factory: Any) -> None:
    # staleness_exponent=0: each global update adds exactly the mean offset of its buffer.
    strategy = FedBuff(buffer_size=2, staleness_exponent=0.0)
    coordinator, task = await coordinator_factory(config(rounds=5), strategy=strategy)
    a, b = ScriptedTrainer(1.0, 10), ScriptedTrainer(1.0, 30)
    workers = asyncio.gather(
        run_worker(coordinator.port, "a", a), run_worker(coordinator.port, "b", b)
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    await workers
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 5.0, atol=1e-5)
    assert [r.round for r in result.rounds] == [1, 2, 3, 4, 5]
    assert all(r.workers == 2 and r.staleness is not None for r in result.rounds)
    assert a.rounds_seen + b.rounds_seen >= 10


@pytest.mark.parametrize("max_staleness", [0, 10])
async def test_fedbuff_weighs_or_drops_a_stale_result(
    coordinator_factory: Any, max_staleness: int
) -> None:
    """A slow worker's first result (offset 100), trained from model version 0, arrives after
    at least 2 updates by a fast worker: it is weighted by 1/sqrt(1+s), or dropped past the
    maximum staleness. With buffer_size=1 every metrics row is one result, so the final model
    must be the sum of offset/sqrt(1+s) over the rows, whatever the timing."""
    gate = threading.Event()
    strategy = FedBuff(buffer_size=1, max_staleness=max_staleness, staleness_exponent=0.5)
    coordinator, task = await coordinator_factory(config(rounds=6), strategy=strategy)
    fast = OffsetTrainer(1.0, opens=gate, after=3)
    slow = OffsetTrainer(1.0, first_offset=100.0, wait_for=gate)
    workers = asyncio.gather(
        run_worker(coordinator.port, "fast", fast), run_worker(coordinator.port, "slow", slow)
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    await workers
    rows = [(r.train["offset"], r.staleness or {}) for r in result.rounds]
    assert len(rows) == 6
    assert all(st["max"] <= max_staleness for _, st in rows)
    expected = sum(offset / np.sqrt(1 + st["max"]) for offset, st in rows)
    total = result.weights["linear.bias"] - initial_weights()["linear.bias"]
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    slow_rows = [st for offset, st in rows if offset == 100.0]
    if max_staleness == 0:
        assert not slow_rows
        assert sum(st["dropped"] for _, st in rows) >= 1
    else:
        assert len(slow_rows) == 1
        assert slow_rows[0]["max"] >= 2


async def test_on_round_end_stops_the_federation_early(coordinator_factory: Any) -> None:
    seen: list[Mapping[str, Any]] = []

    class StopAfterTwo(FedAvg):
        may_stop_early = True

        def on_round_end(
            self, round_number: int, weights: Weights, metrics: Mapping[str, Any]
        ) -> bool:
            seen.append(metrics)
            return round_number == 2

    coordinator, task = await coordinator_factory(config(rounds=10), strategy=StopAfterTwo())
    a, b = ScriptedTrainer(1.0, 10), ScriptedTrainer(1.0, 10)
    await asyncio.gather(run_worker(coordinator.port, "a", a), run_worker(coordinator.port, "b", b))
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [r.round for r in result.rounds] == [1, 2]
    assert a.rounds_seen == 2  # round 3 never started
    assert [m["round"] for m in seen] == [1, 2]
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 2.0, atol=1e-6)


async def test_sampled_rounds_need_only_the_sampled_workers(coordinator_factory: Any) -> None:
    strategy = FedAvg()
    strategy.sampler = ClientSampler(fraction=0.5, min_workers=1, seed=0)
    coordinator, task = await coordinator_factory(
        config(rounds=3, min_workers=4), strategy=strategy
    )
    trainers = [ScriptedTrainer(1.0, 10) for _ in range(4)]
    await asyncio.gather(
        *(run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(trainers))
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [r.workers for r in result.rounds] == [2, 2, 2]
    assert sum(t.rounds_seen for t in trainers) == 6
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 3.0, atol=1e-6)


async def test_median_ignores_a_poisoned_worker_through_the_protocol(
    coordinator_factory: Any,
) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=3), strategy=load_strategy("median")
    )
    await asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(2.0, 10)),
        run_worker(coordinator.port, "evil", ScriptedTrainer(-1000.0, 10**6)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 1.0, atol=1e-5)
