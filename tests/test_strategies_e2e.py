"""Every built-in strategy, and the example custom one, through real `fed-server` and
`fed-worker` processes: options from a TOML [strategy] table or --strategy-options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Proc, start_server, start_worker
from test_strategies_engine import CASES as ENGINE_CASES

from fedcore.cli_support import parse_args_with_config
from fedcore.errors import ConfigError
from fedcore.server.cli import build_parser, config_from_args
from fedcore.strategy import BUILTIN_STRATEGIES, FedAdam, load_strategy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# name -> (options, rounds, extra server flags): one federation per distinct code path (the
# worker's proximal term with client sampling, a server optimiser's state, a rule that needs
# every update, asynchronous buffering, a user strategy by path that ends the federation).
# Strategies that differ from these only in the coordinator's arithmetic run in-process in
# tests/test_strategies_engine.py.
CASES: dict[str, tuple[dict[str, Any], int, list[str]]] = {
    "fedprox": ({"mu": 0.1, "fraction-fit": 0.6, "sample-seed": 1}, 3, []),
    "fedadam": ({"server-lr": 0.01}, 3, []),
    "multi-krum": ({"num-byzantine": 0, "num-selected": 2}, 3, []),
    "fedbuff": ({"buffer-size": 2, "max-staleness": 4}, 4, []),
    "clipped_fedavg:ClippedFedAvg": ({"max-norm": 50.0, "target-accuracy": 0.4}, 6, []),
}


def test_every_builtin_has_an_end_to_end_case() -> None:
    assert set(BUILTIN_STRATEGIES) <= set(CASES) | set(ENGINE_CASES)


def _toml(value: object) -> str:
    return json.dumps(value)  # numbers and strings are spelled the same in TOML


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_runs_end_to_end(
    name: str,
    shards: Path,
    tmp_path: Path,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options, rounds, flags = CASES[name]
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))  # for the custom strategy
    metrics = tmp_path / "metrics.jsonl"
    config = tmp_path / "federation.toml"
    lines = [f"rounds = {rounds}", "min-workers = 3", "[strategy]", f"name = {_toml(name)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    config.write_text("\n".join(lines) + "\n")
    server, port = start_server(
        procs,
        "--config",
        str(config),
        "--model",
        "mnist-mlp",
        "--lr",
        "0.1",
        "--heartbeat-interval",
        "0.5",
        "--eval-data",
        str(shards / "test.npz"),
        "--metrics-out",
        str(metrics),
        *flags,
    )
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(3)]
    assert server.wait(120) == 0, server.output
    for w in workers:
        assert w.wait(30) == 0, w.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows, server.output
    assert rows[-1]["accuracy"] > 0.4, rows  # chance is 0.1; 1,200 examples, a few rounds
    if name == "fedprox":  # fraction-fit 0.6 of 3 workers: 2 per round
        assert [r["workers"] for r in rows] == [2, 2, 2]
    elif name == "fedbuff":
        assert [r["round"] for r in rows] == [1, 2, 3, 4]
        assert all(r["workers"] == 2 and r["staleness"]["max"] <= 4 for r in rows)
    elif name.startswith("clipped"):  # stops at 40% accuracy, long before round 6
        assert len(rows) < rounds
        assert "the strategy ended the federation" in server.output
    else:
        assert [r["workers"] for r in rows] == [3] * rounds
        assert "staleness" not in rows[0]


def test_strategy_flags_and_config_tables(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text('[strategy]\nname = "fedadam"\nserver-lr = 0.5\nbeta1 = 0.8\n')
    args = parse_args_with_config(build_parser(), ["--config", str(config)])
    server_config = config_from_args(args)
    assert server_config.strategy == "fedadam"
    assert server_config.strategy_options == {"server-lr": 0.5, "beta1": 0.8}
    strategy = load_strategy(server_config.strategy, server_config.strategy_options)
    assert isinstance(strategy, FedAdam)
    assert (strategy.optimizer.lr, strategy.optimizer.beta1) == (0.5, 0.8)
    # Flags win over the file.
    args = parse_args_with_config(
        build_parser(),
        ["--config", str(config), "--strategy", "fedyogi", "--strategy-options", '{"tau": 0.1}'],
    )
    server_config = config_from_args(args)
    assert (server_config.strategy, server_config.strategy_options) == ("fedyogi", {"tau": 0.1})
    args = parse_args_with_config(build_parser(), ["--strategy-options", "[1]"])
    with pytest.raises(ConfigError, match="must be a JSON object"):
        config_from_args(args)


def test_help_lists_every_strategy_and_its_options() -> None:
    text = build_parser().format_help()
    for name in BUILTIN_STRATEGIES:
        assert f"  {name} " in text
    for option in ("server-lr=0.01", "beta=0.1", "num-byzantine=1", "buffer-size=2", "mu=0.01"):
        assert option in text
    assert "fraction-fit=1.0" in text
    assert "package.module:Class" in text
