"""The data owner's controls end to end: real `fed-server` and `fed-worker --policy` processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Proc, start_server, start_worker

from fedcore.policy import Charge, epsilon_of

pytestmark = pytest.mark.slow

FAST = ["--model", "logreg", "--lr", "0.1", "--heartbeat-interval", "0.5", "--fed-eval-every", "0"]


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secagg_demanding_worker_refuses_a_plain_federation_and_joins_a_secure_one(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # Two-member secure groups are below the workers' default (3): both data owners lower it.
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[secure-aggregation]\nrequired = true\nmin-group-size = 2\n[models]\nallowed = ["logreg"]\n'
    )
    pairs = tmp_path / "pairs.toml"
    pairs.write_text("[secure-aggregation]\nmin-group-size = 2\n")
    plain_metrics, secure_metrics = tmp_path / "plain.jsonl", tmp_path / "secure.jsonl"
    common = ["--min-workers", "2", "--rounds", "1", *FAST]
    plain, plain_port = start_server(
        procs,
        *common,
        "--min-results",
        "1",
        "--round-retries",
        "0",
        "--metrics-out",
        str(plain_metrics),
    )
    secure, secure_port = start_server(
        procs, *common, "--secagg", "--metrics-out", str(secure_metrics)
    )
    shard0, shard1 = shards / "shard-0.npz", shards / "shard-1.npz"
    workers = [
        start_worker(procs, plain_port, shard0, "open-plain"),
        start_worker(procs, plain_port, shard1, "guarded-plain", "--policy", str(policy)),
        start_worker(procs, secure_port, shard0, "open-secure", "--policy", str(pairs)),
        start_worker(procs, secure_port, shard1, "guarded-secure", "--policy", str(policy)),
    ]
    assert plain.wait(120) == 0, plain.output
    assert secure.wait(120) == 0, secure.output
    for w in workers:
        assert w.wait(30) == 0, w.output

    # Plain: the guarded worker refused (logged on both sides, reported per worker), the
    # round went on with the other one.
    refusal = "refused by the worker's policy [secure-aggregation.required]"
    assert refusal in workers[1].output
    assert "sent update" not in workers[1].output
    assert "training logreg" not in workers[1].output
    assert "worker 'guarded-plain' refused its task" in plain.output
    (row,) = _rows(plain_metrics)
    assert row["workers"] == 1
    assert row["failures"] == 1
    assert refusal in row["refused"]["guarded-plain"]  # type: ignore[index]
    # Secure: both took part.
    assert "round 1: sent masked input" in workers[3].output
    assert "securely aggregated 2 masked input(s)" in secure.output
    (row,) = _rows(secure_metrics)
    assert row["workers"] == 2
    assert row["refused"] == {}


def test_worker_stops_training_when_its_budget_is_spent_across_a_restart(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    z, delta = 2.0, 1e-5
    two, three = (epsilon_of([Charge(noise_multiplier=z)] * n, delta=delta) for n in (2, 3))
    ledger = tmp_path / "silo" / "ledger.json"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[budget]\nstudy = "mnist-2026"\nepsilon = {(two + three) / 2}\ndelta = {delta}\n'
        f'ledger = "{ledger}"\n'
    )
    dp = ["--dp-noise-multiplier", str(z), "--dp-clip", "1.0"]  # client-level DP plans
    flags = ["--min-workers", "1", "--round-retries", "0", *dp, *FAST]

    # Federation 1: one round, paid for.
    server, port = start_server(procs, *flags, "--rounds", "1")
    first = start_worker(procs, port, shards / "shard-0.npz", "silo", "--policy", str(policy))
    assert server.wait(120) == 0, server.output
    assert first.wait(30) == 0, first.output
    assert "silo epsilon for study 'mnist-2026' is now" in first.output

    # Federation 2 of the same study, the worker restarted: one more round fits, then it
    # refuses, and the coordinator cannot go on.
    metrics = tmp_path / "metrics.jsonl"
    server, port = start_server(procs, *flags, "--rounds", "3", "--metrics-out", str(metrics))
    again = start_worker(procs, port, shards / "shard-0.npz", "silo", "--policy", str(policy))
    assert server.wait(120) == 2, server.output
    assert again.wait(30) == 0, again.output
    assert "round 2: training task refused by the worker's policy [budget]" in again.output
    assert "the budget is spent" in server.output
    charges = json.loads(ledger.read_text())["studies"]["mnist-2026"]["charges"]
    assert len(charges) == 2
    assert [r["round"] for r in _rows(metrics)] == [1]


def test_a_worker_without_the_required_tag_is_never_selected(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    for i, tags in ((0, '["#mnist", "#digits"]'), (1, '["#digits"]')):
        (tmp_path / f"shard-{i}.npz").write_bytes((shards / f"shard-{i}.npz").read_bytes())
        (tmp_path / f"shard-{i}.meta.toml").write_text(
            f'name = "digits {i}"\ntags = {tags}\nlicense = "CC-BY-SA-3.0"\n'
        )
    metrics = tmp_path / "metrics.jsonl"
    server, port = start_server(
        procs,
        "--min-workers",
        "1",
        "--rounds",
        "2",
        "--require-tag",
        "mnist",
        "--metrics-out",
        str(metrics),
        *FAST,
    )
    untagged = start_worker(procs, port, tmp_path / "shard-1.npz", "untagged")
    server.wait_for_event("tags_missing", worker="untagged", tags=["mnist"], timeout=60)
    tagged = start_worker(procs, port, tmp_path / "shard-0.npz", "tagged")
    assert server.wait(120) == 0, server.output
    assert tagged.wait(30) == 0, tagged.output
    assert untagged.wait(30) == 0, untagged.output
    assert [r["workers"] for r in _rows(metrics)] == [1, 1]
    assert "round 1: training" in tagged.output
    assert "training logreg" not in untagged.output
    # The roster, printed before round 1.
    assert "connected workers: 2 (selecting those tagged #mnist)" in server.output
    assert "no (lacks #mnist)" in server.output
    assert "worker 'tagged' holds dataset 'digits 0' #mnist #digits, 400 examples" in server.output
