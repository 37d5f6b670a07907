"""Secure aggregation end to end: real `fed-server --secagg` and `fed-worker` processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_server, start_worker

from fedcore.certs_cli import main as fed_certs
from fedcore.data import save_shard

pytestmark = pytest.mark.slow

FAST = ["--model", "mnist-mlp", "--lr", "0.1", "--heartbeat-interval", "0.5"]


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secure_fedavg_matches_plain_fedavg_accuracy(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    common = ["--min-workers", "3", "--rounds", "3", "--eval-data", str(shards / "test.npz")]
    # The signed mode: each silo's signing key and the roster, as fed-certs writes them.
    certs = tmp_path / "certs"
    assert fed_certs(["init", "--dir", str(certs), "--workers", "signed-0,signed-1,signed-2"]) == 0
    runs = {}
    # Plain against signed secure aggregation (the unsigned mode runs the same masking code,
    # and the other tests here run it end to end).
    for mode in ("plain", "signed"):
        metrics = tmp_path / f"{mode}.jsonl"
        extra = {"plain": [], "signed": ["--secagg", "--secagg-signed"]}
        server, port = start_server(
            procs, *common, *FAST, *extra[mode], "--metrics-out", str(metrics)
        )
        workers = []
        for i in range(3):
            name = f"{mode}-{i}"
            key = certs / "workers" / f"{name}.signing.pem"
            identity = (
                ["--signing-key", str(key), "--roster", str(certs / "roster.json")]
                if mode == "signed"
                else []
            )
            workers.append(start_worker(procs, port, shards / f"shard-{i}.npz", name, *identity))
        runs[mode] = (server, workers, metrics)
    for server, workers, _ in runs.values():
        assert server.wait(180) == 0, server.output
        assert all(w.wait(30) == 0 for w in workers)
    plain, signed = (_rows(runs[m][2]) for m in ("plain", "signed"))
    assert [r["workers"] for r in signed] == [3, 3, 3]
    assert "securely aggregated 3 masked input(s)" in runs["signed"][0].output
    assert all("signed the unmasking request" in w.output for w in runs["signed"][1])
    plain_acc = float(plain[-1]["accuracy"])  # type: ignore[arg-type]
    signed_acc = float(signed[-1]["accuracy"])  # type: ignore[arg-type]
    assert abs(plain_acc - signed_acc) <= 0.005, (plain_acc, signed_acc)
    assert signed_acc > 0.75


def test_workers_killed_before_and_after_their_masked_input_are_survived(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # Big shards train for seconds, the small one for a fraction: the killed-after worker
    # sends its masked input long before the round can move on to unmasking.
    parts = [np.load(shards / f"shard-{i}.npz") for i in range(3)]
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    save_shard(tmp_path / "big.npz", x, y)
    save_shard(tmp_path / "small.npz", x[:64], y[:64])
    metrics = tmp_path / "metrics.jsonl"
    flags = "--min-workers 4 --min-results 2 --rounds 2 --epochs 3 --fed-eval-every 0".split()
    secagg = ["--secagg", "--secagg-threshold", "2", "--secagg-phase-timeout", "20"]
    server, port = start_server(procs, *flags, *secagg, "--metrics-out", str(metrics), *FAST)
    # t=2 of 4, and a round-2 group of 2, are below the workers' safe defaults (t above half
    # the group, groups of 3): these data owners relax them in their policy.
    policy = tmp_path / "policy.toml"
    policy.write_text("[secure-aggregation]\nmin-group-size = 2\nmin-threshold = 0.25\n")
    relaxed = ["--policy", str(policy)]
    survivors = [
        start_worker(procs, port, tmp_path / "big.npz", f"silo-{i}", *relaxed) for i in range(2)
    ]
    before = start_worker(procs, port, tmp_path / "big.npz", "killed-before", *relaxed)
    after = start_worker(procs, port, tmp_path / "small.npz", "killed-after", *relaxed)
    before.wait_for_event("secagg_phase", phase="key_shares", timeout=60)
    before.signal(signal.SIGKILL)
    after.wait_for_event("update_sent", round=1, timeout=60)  # its masked input
    after.signal(signal.SIGKILL)
    assert server.wait(180) == 0, server.output
    assert all(w.wait(30) == 0 for w in survivors)
    assert after.matching("secagg_phase", phase="unmask") == []
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == [1, 2]
    # Round 1: the killed-after worker's input counts (its self mask was removed with the
    # survivors' shares); the killed-before worker's pairwise masks were reconstructed away.
    assert server.matching("secagg_aggregated", round=1, inputs=3, dropped=1, threshold=2)
    assert rows[0]["workers"] == 3
    assert rows[1]["workers"] == 2
