"""Built-in strategies that differ from the real-process cases (tests/test_strategies_e2e.py)
only in the coordinator's arithmetic, run through the same [strategy] TOML table and CLI
config path into an in-process coordinator, with three in-process workers training
mnist-mlp on the MNIST shards: the same federation as the process cases, without starting
four interpreters for each."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from fedcore.cli_support import parse_args_with_config
from fedcore.data import load_shard
from fedcore.server import Coordinator
from fedcore.server.cli import build_parser, config_from_args
from fedcore.worker import TorchTrainer, Worker

pytestmark = pytest.mark.slow

TIMEOUT = 120

# name -> options; 3 rounds of 3 workers each. The server optimisers share fedadam's code
# path and the robust rules multi-krum's (both run as processes in test_strategies_e2e.py).
CASES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"server-lr": 1.0, "momentum": 0.5},
    "fedadagrad": {"server-lr": 0.03},
    "fedyogi": {"server-lr": 0.01},
    "median": {},
    "trimmed-mean": {"beta": 0.34},
    "krum": {"num-byzantine": 0},
}


@pytest.mark.parametrize("name", list(CASES))
async def test_strategy_runs_in_the_engine(name: str, shards: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "federation.toml"
    lines = ["rounds = 3", "min-workers = 3", "[strategy]", f"name = {json.dumps(name)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in CASES[name].items()]
    config_file.write_text("\n".join(lines) + "\n")
    argv = ["--config", str(config_file), "--model", "mnist-mlp", "--lr", "0.1"]
    argv += ["--listen", "127.0.0.1:0", "--heartbeat-interval", "0.5"]
    argv += ["--eval-data", str(shards / "test.npz")]
    config = config_from_args(parse_args_with_config(build_parser(), argv))
    assert (config.strategy, config.strategy_options) == (name, CASES[name])
    coordinator = Coordinator(config)
    task = asyncio.create_task(coordinator.run())
    try:
        await asyncio.wait_for(coordinator.ready.wait(), 30)
        workers = [
            Worker(
                f"127.0.0.1:{coordinator.port}",
                f"silo-{i}",
                TorchTrainer(load_shard(shards / f"shard-{i}.npz")),
                backoff_initial=0.05,
                give_up_after=TIMEOUT,
            )
            for i in range(3)
        ]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), TIMEOUT)
        result = await asyncio.wait_for(task, TIMEOUT)
    finally:
        coordinator.stop()
        if not task.done():
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
    rows = result.rounds
    assert [r.workers for r in rows] == [3, 3, 3], rows
    assert rows[-1].staleness is None
    assert (rows[-1].accuracy or 0.0) > 0.4, rows  # chance is 0.1; 1,200 examples, 3 rounds
