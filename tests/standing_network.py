"""A standing network in process (real gRPC) with in-process workers, for tests of jobs that
share its silos (secure aggregation by job, several tasks per worker)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from test_coordinator import TIMEOUT, ScriptedTrainer, config

from fedcore.data.metadata import DatasetMetadata
from fedcore.policy import Policy
from fedcore.server.network import Network, NetworkSettings
from fedcore.server.state.analytics import AnalyticsSettings
from fedcore.worker import Worker
from fedcore.worker.policy import PolicyGuard


@dataclass(frozen=True)
class Silo:
    """One worker: its name (its dataset's too), trainer, tags and ``[jobs] max-tasks``."""

    name: str
    trainer: ScriptedTrainer
    tags: tuple[str, ...]
    max_tasks: int = 1


@contextlib.asynccontextmanager
async def standing_network(tmp_path: Path, silos: Sequence[Silo]) -> AsyncIterator[Network]:
    """Two jobs may run at once; jobs are submitted to its store directly (nobody enrolled)."""
    scientists = tmp_path / "scientists.json"
    scientists.write_text('{"version": 1, "scientists": {}}')
    cfg = replace(config(min_workers=3), analytics=AnalyticsSettings(scientists))
    network = Network(cfg, NetworkSettings(tmp_path / "state", max_running=2))
    serving = asyncio.create_task(network.run())
    workers: list[asyncio.Task[Any]] = []
    try:
        await asyncio.wait_for(network.ready.wait(), TIMEOUT)
        for silo in silos:
            guard = None
            if silo.max_tasks != 1:
                policy = Policy(max_tasks=silo.max_tasks)
                guard = PolicyGuard(policy, num_examples=silo.trainer.num_examples)
            worker = Worker(
                f"127.0.0.1:{network.port}",
                silo.name,
                silo.trainer,
                backoff_initial=0.05,
                give_up_after=TIMEOUT,
                guard=guard,
                dataset=DatasetMetadata(silo.name, tags=silo.tags),
            )
            workers.append(asyncio.create_task(worker.run()))
        yield network
    finally:
        network.stop()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, TIMEOUT)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def until_final(network: Network, job_ids: list[str]) -> None:
    """Wait (bounded) until every job in ``job_ids`` has ended."""
    async with asyncio.timeout(TIMEOUT):
        # The job store has no change signal; the wait is bounded above.
        while not all(network.store.get(j).final for j in job_ids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
