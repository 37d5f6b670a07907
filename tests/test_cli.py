"""End to end: real `fed-server` and `fed-worker` processes over localhost."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Proc, start_server, start_worker
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

FAST = ["--model", "mnist-mlp", "--lr", "0.1", "--heartbeat-interval", "0.5"]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_federation_runs_to_completion(
    shards: Path, tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real console scripts, exec'd: what users run (the rest of the suite forks most
    # fed-* processes from the test zygote, tests/forked.py).
    monkeypatch.setenv("FEDCORE_TEST_EXEC", "1")
    config = tmp_path / "federation.toml"
    config.write_text('rounds = 3\nmin-workers = 3\nmodel = "mnist-mlp"\nfed-eval-every = 3\n')
    metrics, model = tmp_path / "metrics.jsonl", tmp_path / "model.safetensors"
    server, port = start_server(
        procs,
        "--config",
        str(config),
        "--lr",
        "0.1",
        "--eval-data",
        str(shards / "test.npz"),
        "--metrics-out",
        str(metrics),
        "--save-model",
        str(model),
    )
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(3)]
    assert server.wait(120) == 0, server.output
    for w in workers:
        assert w.wait(30) == 0, w.output
        assert "federation over" in w.output

    rows = _rows(metrics)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["workers"] == 3 and r["failures"] == 0 for r in rows)
    assert rows[-1]["accuracy"] > 0.75  # 1,200 examples, 3 rounds of the MLP
    assert rows[-1]["federated"]["accuracy"] > 0.75
    assert all(int(r["bytes_sent"]) >= 3 * 199_210 * 4 for r in rows)
    # The table on the console, and the final model in safetensors format.
    assert "accuracy" in server.output
    assert "round" in server.output
    saved = load_file(str(model))
    assert saved["net.1.weight"].shape == (200, 784)
    assert len(saved) == 6


def test_workers_started_first_wait_for_the_coordinator(shards: Path, procs: list[Proc]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"early-{i}") for i in range(2)]
    workers[0].wait_for_event("not_connected", timeout=30)
    server = Proc(
        [
            str(BIN / "fed-server"),
            "--listen",
            f"127.0.0.1:{port}",
            "--min-workers",
            "2",
            "--rounds",
            "1",
            *FAST,
        ],
        "fed-server",
    )
    procs.append(server)
    assert server.wait(120) == 0, server.output
    assert all(w.wait(30) == 0 for w in workers)


def test_worker_killed_mid_round_is_dropped_and_the_round_completes(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    flags = "--min-workers 3 --min-results 2 --rounds 3 --epochs 10 --fed-eval-every 0".split()
    server, port = start_server(procs, *flags, "--metrics-out", str(metrics), *FAST)
    survivors = [
        start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(2)
    ]
    victim = start_worker(procs, port, shards / "shard-2.npz", "victim")
    server.wait_for_event("round_started", round=1, workers=3)
    victim.wait_for_event("training", round=1, timeout=30)
    victim.signal(signal.SIGKILL)
    assert server.wait(180) == 0, server.output
    assert all(w.wait(30) == 0 for w in survivors)
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["workers"] == 2
    assert rows[0]["failures"] == 1
    assert "worker 'victim' dropped" in server.output


def test_worker_with_mismatched_model_is_refused_with_a_clear_message(
    shards: Path, procs: list[Proc]
) -> None:
    server, port = start_server(procs, "--min-workers", "1", "--rounds", "1", *FAST)
    wrong_name = start_worker(procs, port, shards / "shard-0.npz", "wrong", "--model", "mnist-cnn")
    assert wrong_name.wait(60) == 2
    assert "worker 'wrong' uses model mnist-cnn, the federation runs mnist-mlp" in wrong_name.output
    wrong_shape = start_worker(
        procs,
        port,
        shards / "shard-1.npz",
        "narrow",
        "--model",
        "mnist-mlp",
        "--model-params",
        '{"hidden": 50}',
    )
    assert wrong_shape.wait(60) == 2
    assert (
        "does not match the federation's mnist-mlp: parameter 'net.1.weight' is float32[50, 784]"
        in wrong_shape.output
    )
    good = start_worker(procs, port, shards / "shard-2.npz", "good", "--model", "mnist-mlp")
    assert server.wait(120) == 0, server.output
    assert good.wait(30) == 0


def test_sigint_stops_the_coordinator_cleanly(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    model = tmp_path / "model.safetensors"
    server, port = start_server(
        procs,
        "--min-workers",
        "1",
        "--rounds",
        "1000",
        "--save-model",
        str(model),
        "--fed-eval-every",
        "0",
        *FAST,
    )
    worker = start_worker(procs, port, shards / "shard-0.npz", "silo-0")
    server.wait_for_event("round_started", round=2, workers=1)
    server.signal(signal.SIGINT)
    assert server.wait(60) == 0, server.output
    assert model.exists()
    # Stopped before its last round: the worker is not told the federation is over; it keeps
    # reconnecting (for a --resume) until its own stop.
    worker.wait_for_event("not_connected", timeout=30)
    assert worker.popen.poll() is None, worker.output
    worker.signal(signal.SIGINT)
    assert worker.wait(30) == 0, worker.output
    assert "federation over" not in worker.output


def test_bad_flags_explain_themselves(tmp_path: Path, procs: list[Proc]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("roundz = 3\n")
    server = Proc([str(BIN / "fed-server"), "--config", str(bad)], "fed-server")
    procs.append(server)
    assert server.wait(60) == 2
    assert "unknown setting 'roundz'" in server.output
