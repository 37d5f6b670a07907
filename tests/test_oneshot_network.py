"""A one-shot federation is one job on a network of its own (issue 24): the flags' job runs
on a Network without a state folder, and its workers are told why the federation is over."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, run_worker

from fedcore.errors import RoundFailedError
from fedcore.server import ServerConfig
from fedcore.server.jobs.job import TrainingJob
from fedcore.server.jobs.spec import job_config
from fedcore.server.network import Network
from fedcore.worker import WorkerState


def _files(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def _farewells(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "reason", ""))
        for r in caplog.records
        if getattr(r, "event", None) == "federation_over"
    ]


async def test_the_flags_job_runs_on_a_network_of_its_own(
    coordinator_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="fedcore")
    coordinator, task = await coordinator_factory(config(rounds=1))
    assert isinstance(coordinator.network, Network)
    assert coordinator.network.settings.state_dir is None
    assert isinstance(coordinator.job, TrainingJob)
    assert coordinator.job.context is coordinator.context
    workers = await asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(3.0, 10)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    assert len(result.rounds) == 1
    assert [w.state for w in workers] == [WorkerState.FINISHED] * 2
    assert _farewells(caplog) == ["training finished after 1 round"] * 2
    assert _files(tmp_path) == []  # no job store, no audit log: nothing on disk


async def test_a_failed_job_is_raised_and_its_workers_told_why(
    coordinator_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedcore")
    coordinator, task = await coordinator_factory(config(min_workers=2, join_timeout=3))
    worker = asyncio.create_task(run_worker(coordinator.port, "lonely", ScriptedTrainer(1, 10)))
    with pytest.raises(RoundFailedError, match=r"only 1 of 2 workers joined within 3 s"):
        await asyncio.wait_for(task, TIMEOUT)
    assert (await worker).state is WorkerState.FINISHED
    (reason,) = _farewells(caplog)
    assert reason.startswith("the federation failed: only 1 of 2 workers joined")


def test_a_submitted_job_waits_for_its_workers_without_the_processs_join_timeout() -> None:
    network = ServerConfig.from_flags(join_timeout=5.0)
    assert network.limits.join_timeout == 5.0
    assert job_config(network, {"rounds": 1}, "job1").limits.join_timeout is None
