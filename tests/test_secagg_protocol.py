"""Secure aggregation through the real gRPC protocol, in-process: exact weighted FedAvg,
dropouts, and refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from fedcore.server import Coordinator
from fedcore.worker import TrainingFailed, Worker
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.errors import ConfigError
from fedcore.secagg import SecAggParams
from fedcore.strategy import FedAvg

SECAGG = SecAggParams(clip=4.0, bits=24, phase_timeout=5.0)


async def test_secure_fedavg_matches_plain_fedavg(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(config(rounds=2, min_workers=3, secagg=SECAGG))
    trainers = [ScriptedTrainer(1.0, 30), ScriptedTrainer(-0.5, 10), ScriptedTrainer(2.0, 20)]
    await asyncio.gather(
        *(run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(trainers))
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    mean_offset = (1.0 * 30 - 0.5 * 10 + 2.0 * 20) / 60
    step = SECAGG.clip / (2 ** (SECAGG.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(
            result.weights[name], w0 + 2 * mean_offset, rtol=0, atol=4 * step
        )
    assert [r.workers for r in result.rounds] == [3, 3]


async def test_strategy_needing_individual_updates_is_refused() -> None:
    class Robust(FedAvg):
        needs_individual_updates = True

    with pytest.raises(ConfigError, match="must see individual updates"):
        Coordinator(config(secagg=SECAGG), strategy=Robust())


async def test_worker_lost_before_masking_is_survived(coordinator_factory: Any) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=4, min_results=2, secagg=SECAGG)
    )

    class Crashing(ScriptedTrainer):
        def fit(self, *args: Any) -> Any:
            raise TrainingFailed("disk on fire")

    good = [ScriptedTrainer(1.0, 10), ScriptedTrainer(3.0, 30), ScriptedTrainer(2.0, 20)]
    crashing = Worker(f"127.0.0.1:{coordinator.port}", "crash", Crashing(0, 5), give_up_after=5)
    runs = [run_worker(coordinator.port, f"w{i}", t) for i, t in enumerate(good)]
    crash = asyncio.create_task(crashing.run())
    await asyncio.gather(*runs)
    result = await asyncio.wait_for(task, TIMEOUT)
    crash.cancel()
    expected = (1.0 * 10 + 3.0 * 30 + 2.0 * 20) / 60
    step = SECAGG.clip / (2 ** (SECAGG.bits - 1) - 1)
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + expected, rtol=0, atol=4 * step)
    assert result.rounds[0].workers == 3
    assert result.rounds[0].failures == 1
