"""Crash recovery: atomic checkpoints, resume with strategy state, and a coordinator killed with
SIGKILL mid-federation (real processes) that resumes with no round lost or counted twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BIN, Proc, start_worker
from test_coordinator import TIMEOUT, ScriptedTrainer, config, run_worker

from fedcore.errors import CheckpointError
from fedcore.server import Coordinator
from fedcore.server.state.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedcore.strategy import FedAvg
from fedcore.weights import Weights


class MomentumAvg(FedAvg):
    """FedAvg with server momentum: its state must survive a restart for exact results."""

    def __init__(self) -> None:
        self.velocity: dict[str, np.ndarray] = {}
        self.steps = 0

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Any,
        failures: Any,
    ) -> Weights:
        out = {}
        for k, g in global_weights.items():
            v = 0.5 * self.velocity.get(k, np.zeros_like(g)) + (aggregate[k] - g)
            self.velocity[k] = v
            out[k] = g + v
        self.steps += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": np.int64(self.steps), "velocity": dict(self.velocity), "tag": ["m", 1]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.velocity = {k: np.array(v) for k, v in state["velocity"].items()}


def test_checkpoint_round_trip_and_atomic_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights: Weights = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(2, np.float64),
    }
    states = {"strategy": {"m": {"w": np.full(3, 0.5, np.float32)}, "n": np.int64(3), "x": None}}
    first = Checkpoint(1, weights, [{"round": 1}], states, {"model": "m"})
    save_checkpoint(tmp_path, first)
    got = load_checkpoint(tmp_path)
    assert got is not None
    assert got.round == 1
    assert got.metrics == [{"round": 1}]
    np.testing.assert_array_equal(got.weights["w"], weights["w"])
    assert got.weights["b"].dtype == np.float64
    np.testing.assert_array_equal(got.states["strategy"]["m"]["w"], np.full(3, 0.5, np.float32))
    assert got.states["strategy"]["n"] == 3
    assert got.states["strategy"]["x"] is None

    # A crash between writing the temp file and renaming it leaves the old checkpoint whole.
    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, Checkpoint(2, weights, [], {}, {}))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path).round == 1  # type: ignore[union-attr]

    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="is unusable"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


async def test_resume_continues_exactly_where_the_checkpoint_left_off(
    coordinator_factory: Any, tmp_path: Path
) -> None:
    """2 rounds, stop, resume for rounds 3-4 == 4 rounds straight, bit for bit (the server
    momentum, restored from the checkpoint, shapes rounds 3 and 4)."""

    async def federation(**kw: Any) -> Coordinator:
        coordinator, task = await coordinator_factory(config(**kw), strategy=MomentumAvg())
        await asyncio.gather(
            run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 30)),
            run_worker(coordinator.port, "b", ScriptedTrainer(-0.5, 10)),
        )
        await asyncio.wait_for(task, TIMEOUT)
        return coordinator  # type: ignore[no-any-return]

    straight = await federation(rounds=4)
    ckpt = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    first = await federation(rounds=2, checkpoint_dir=ckpt, metrics_out=metrics)
    assert first.start_round == 1
    assert load_checkpoint(ckpt).round == 2  # type: ignore[union-attr]
    resumed = await federation(rounds=4, checkpoint_dir=ckpt, resume=True, metrics_out=metrics)
    assert resumed.start_round == 3
    assert resumed.strategy.steps == 4  # type: ignore[attr-defined]
    for name, w in straight.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], w)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert load_checkpoint(ckpt).round == 4  # type: ignore[union-attr]
    # Resuming a finished federation runs no round, and another model's checkpoint is refused.
    done = Coordinator(config(rounds=4, checkpoint_dir=ckpt, resume=True), MomentumAvg())
    assert done.start_round == 5
    from fedcore.plan import ModelSpec

    with pytest.raises(CheckpointError, match="belongs to another federation"):
        Coordinator(
            config(model=ModelSpec("logreg", {"num_classes": 5}), checkpoint_dir=ckpt, resume=True)
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_coordinator_killed_with_sigkill_resumes_and_workers_reconnect(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    port = _free_port()
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [
        str(BIN / "fed-server"),
        "--listen", f"127.0.0.1:{port}", "--min-workers", "2", "--rounds", "4",
        "--model", "mnist-mlp", "--lr", "0.1", "--heartbeat-interval", "0.5",
        "--fed-eval-every", "0", "--eval-data", str(shards / "test.npz"),
        "--checkpoint-dir", str(ckpt), "--metrics-out", str(metrics), "--resume", "--log-json",
    ]  # fmt: skip

    def server() -> Proc:
        proc = Proc(args, "fed-server")
        procs.append(proc)
        return proc

    first = server()
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(2)]
    # Kill 1: in the middle of round 2, after round 1's checkpoint.
    first.wait_for_event("checkpointed", round=1, timeout=120)
    first.wait_for_event("round_started", round=2, workers=2)
    first.signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert load_checkpoint(ckpt).round == 1  # type: ignore[union-attr]
    # Kill 2: right after a checkpoint was written.
    second = server()
    second.wait_for_event("resumed", round=1)
    second.wait_for_event("checkpointed", round=2, timeout=120)
    second.signal(signal.SIGKILL)
    assert second.wait(30) == -signal.SIGKILL
    kept = load_checkpoint(ckpt)
    assert kept is not None
    assert kept.round >= 2
    third = server()
    third.wait_for_event("resumed", round=kept.round)
    assert third.wait(180) == 0, third.output
    for w in workers:
        assert w.wait(30) == 0, w.output
        assert "federation over" in w.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(r["workers"] == 2 for r in rows)
    assert rows[-1]["accuracy"] > 0.6  # 800 examples, 4 rounds of the MLP
    assert load_checkpoint(ckpt).round == 4  # type: ignore[union-attr]


@pytest.mark.slow
def test_coordinator_stopped_with_sigterm_leaves_workers_reconnecting_for_resume(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """A clean stop (SIGTERM) before the last round is a pause, not the end: the workers are
    not told the federation is over, keep reconnecting, and a coordinator started with
    --resume finishes the rounds with them; only then do they exit."""
    port = _free_port()
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [
        str(BIN / "fed-server"),
        "--listen", f"127.0.0.1:{port}", "--min-workers", "2", "--rounds", "3",
        "--model", "mnist-mlp", "--lr", "0.1", "--heartbeat-interval", "0.5",
        "--fed-eval-every", "0", "--checkpoint-dir", str(ckpt), "--metrics-out", str(metrics),
        "--resume", "--log-json",
    ]  # fmt: skip
    first = Proc(args, "fed-server")
    procs.append(first)
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(2)]
    first.wait_for_event("checkpointed", round=1, timeout=120)
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0, first.output
    for w in workers:
        # Positive control: the stream really ended (the worker noticed and retries).
        w.wait_for_event("not_connected", timeout=30)
        assert w.popen.poll() is None, w.output  # still running: not told "it is over"
        assert "federation over" not in w.output
    second = Proc(args, "fed-server")
    procs.append(second)
    second.wait_for_event("resumed")
    assert second.wait(180) == 0, second.output
    for w in workers:
        assert w.wait(30) == 0, w.output
        over = w.matching("federation_over", reason="training finished after 3 rounds")
        assert len(over) == 1, w.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["workers"] == 2 for r in rows)
