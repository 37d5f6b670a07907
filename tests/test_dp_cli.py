"""Differential privacy end to end: real `fed-server` and `fed-worker` processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import Proc, start_server, start_worker

from fedcore.privacy import PrivacyAccountant

pytestmark = pytest.mark.slow

# logreg: the smallest model, so these multi-process tests stay quick.
FAST = ["--model", "logreg", "--lr", "0.1", "--heartbeat-interval", "0.5"]


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_budget_stop_and_per_silo_epsilon_through_real_processes(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    z, target = 3.0, 1.5
    expected = 0  # rounds the budget allows: every round takes all 3 workers (q = 1)
    while True:
        acc = PrivacyAccountant(mechanism="rdp")  # client-level DP: discrete noise, Rényi DP
        acc.step(noise_multiplier=z, sample_rate=1.0, steps=expected + 1)
        if acc.get_epsilon(delta=1e-5) > target:
            break
        expected += 1
    assert 1 <= expected < 10
    metrics = tmp_path / "metrics.jsonl"
    dp = ["--dp-noise-multiplier", str(z), "--dp-clip", "0.5", "--dp-target-epsilon", str(target)]
    server, port = start_server(
        procs, "--min-workers", "3", "--rounds", "10", "--fed-eval-every", "0",
        "--metrics-out", str(metrics), *dp, *FAST,
    )  # fmt: skip
    dpsgd = ["--dpsgd-noise-multiplier", "1.0", "--dpsgd-clip", "1.0"]
    workers = [
        start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}", *(dpsgd if i else []))
        for i in range(3)
    ]
    assert server.wait(180) == 0, server.output
    assert all(w.wait(30) == 0 for w in workers)
    assert "privacy budget" in server.output
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == list(range(1, expected + 1))
    epsilons = [float(r["epsilon"]) for r in rows]  # type: ignore[arg-type]
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] <= target
    reference = PrivacyAccountant(mechanism="rdp")
    reference.step(noise_multiplier=z, sample_rate=1.0, steps=expected)
    assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=1e-5))
    for r in rows:
        assert r["delta"] == 1e-5
        privacy = r["privacy"]
        assert isinstance(privacy, dict)
        assert privacy["aggregated"] == 3
        assert privacy["clip_norm"] == 0.5
        assert set(privacy["silos"]) == {"silo-1", "silo-2"}  # the DP-SGD silos
        # Client-level: every worker's own epsilon; the reported one is the largest.
        assert set(privacy["workers"]) == {"silo-0", "silo-1", "silo-2"}
        assert max(privacy["workers"].values()) == r["epsilon"]
        assert "dpsgd_epsilon" not in r["train"]  # type: ignore[operator]
    first, last = rows[0]["privacy"]["silos"], rows[-1]["privacy"]["silos"]  # type: ignore[index]
    assert 0 < first["silo-1"]["epsilon"] <= last["silo-1"]["epsilon"]
    assert last["silo-1"]["delta"] == 1e-5
    assert math.isfinite(last["silo-2"]["epsilon"])


def test_distributed_dp_under_secure_aggregation_end_to_end(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """Workers clip and add their noise share before masking; the coordinator only unmasks a
    noised sum. 3 workers answer where 2 (--min-results) would do: the noise is
    over-provisioned and the accountant charges z * sqrt(3/2), an upper bound on epsilon
    since each worker's default policy adds the whole noise itself."""
    z = 0.05
    metrics = tmp_path / "metrics.jsonl"
    server, port = start_server(
        procs, "--min-workers", "3", "--min-results", "2", "--rounds", "2",
        "--eval-data", str(shards / "test.npz"), "--metrics-out", str(metrics),
        "--secagg", "--secagg-threshold", "2",
        "--dp-mode", "distributed", "--dp-noise-multiplier", str(z), "--dp-clip", "1.0", *FAST,
    )  # fmt: skip
    workers = [start_worker(procs, port, shards / f"shard-{i}.npz", f"h-{i}") for i in range(3)]
    assert server.wait(180) == 0, server.output
    assert all(w.wait(30) == 0 for w in workers)
    assert [e["round"] for e in server.matching("secagg_aggregated", inputs=3)] == [1, 2]
    # Each worker's default policy trusts no other silo (issue 22): it adds the whole z C,
    # not z C / sqrt(2) as --min-results would have it.
    assert all("noise share std 0.05 added" in w.output for w in workers)
    assert not any("were clipped" in w.output for w in workers)  # the range fits the noise
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        privacy = r["privacy"]
        assert isinstance(privacy, dict)
        assert privacy["aggregated"] == 3
        assert privacy["noise_multiplier"] == pytest.approx(z * math.sqrt(3 / 2))
    # Distributed mode is accounted by Rényi DP (discrete-Gaussian shares have no proven PLD).
    reference = PrivacyAccountant(mechanism="rdp")
    reference.step(noise_multiplier=z * math.sqrt(3 / 2), sample_rate=1.0, steps=2)
    assert rows[-1]["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))
    assert float(rows[-1]["accuracy"]) > 0.6  # type: ignore[arg-type]
