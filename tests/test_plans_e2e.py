"""A shipped plan through real processes: a worker without the model's code trains it, and a
data owner's approval queue holds, admits and then denies it (one small federation)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import Proc, start_server, start_worker

from fedcore.worker.cli import main

pytestmark = pytest.mark.slow


def _requests(capsys: pytest.CaptureFixture[str], policy: Path, *args: str) -> str:
    """``fed-worker requests --policy POLICY ARGS`` (in process: the owner's command line)."""
    capsys.readouterr()
    assert main(["requests", "--policy", str(policy), *args]) == 0
    return capsys.readouterr().out


def _run_requests(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["requests", *args]) == 0
    return capsys.readouterr().out


def test_plan_waits_for_approval_runs_once_approved_and_a_denial_reaches_the_coordinator(
    procs: list[Proc], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[plans]\nrequire-approval = true\nrequests = "queue"\n')
    metrics = tmp_path / "metrics.jsonl"
    # Rounds of a tiny model at batch size 1 (about a second each): the federation outlives
    # the owner's decisions and is stopped at teardown. One result per round is enough, so
    # rounds go on without "owner" while its plan waits.
    server, port = start_server(
        procs,
        "--model", "logreg", "--ship-plan", "--rounds", "300", "--min-workers", "2",
        "--min-results", "1", "--epochs", "2", "--batch-size", "1", "--lr", "0.01",
        "--metrics-out", str(metrics),
    )  # fmt: skip
    digest = server.wait_for_event("plan_shipped")["plan"]
    # Neither worker has --model: the plan is all they get.
    free = start_worker(procs, port, shards / "shard-0.npz", "free")
    owner = start_worker(procs, port, shards / "shard-1.npz", "owner", "--policy", str(policy))
    free.wait_for_event("training", model=f"plan-{digest}")
    waiting = re.compile(rf"awaiting approval: plan {digest[:16]}")
    server.wait_for_event("task_refused", worker="owner", reason=waiting)
    assert owner.matching("training") == []

    listed = _requests(capsys, policy, "list")
    assert f"{digest[:16]}  pending" in listed
    shown = _requests(capsys, policy, "show", digest[:12])
    assert "float32[batch, 1, 28, 28]  ->  output float32[batch, 10]" in shown
    assert "7,850 trainable" in shown
    assert "2 local epoch(s), batch 1" in shown

    assert "approved" in _requests(capsys, policy, "approve", digest[:12])
    owner.wait_for_event("training", model=f"plan-{digest}", timeout=90)
    assert "denied: not for our patients" in _requests(
        capsys, policy, "deny", digest[:12], "--reason", "not for our patients"
    )
    denied = re.compile(rf"plan {digest[:16]} was denied by the data owner: not for our patients")
    server.wait_for_event("task_refused", worker="owner", reason=denied, timeout=90)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    assert rows
    assert all(row["plan"] == digest for row in rows)
    assert any("awaiting approval" in row["refused"].get("owner", "") for row in rows)


def test_a_plan_awaiting_approval_holds_the_round_until_the_owner_approves(
    procs: list[Proc], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27, trap 1: with the default --min-results (every worker), a worker whose owner
    has not approved yet does not end the federation; once approved it trains in that very
    round, and every process finishes the federation."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[plans]\nrequire-approval = true\nrequests = "queue"\n')
    metrics = tmp_path / "metrics.jsonl"
    server, port = start_server(
        procs,
        "--model", "logreg", "--ship-plan", "--rounds", "2", "--min-workers", "2",
        "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--metrics-out", str(metrics),
        "--approval-poll", "1",  # asked again every second: the round sees the approval at once
    )  # fmt: skip
    digest = server.wait_for_event("plan_shipped")["plan"]
    free = start_worker(procs, port, shards / "shard-0.npz", "free")
    owner = start_worker(procs, port, shards / "shard-1.npz", "owner", "--policy", str(policy))
    # Positive control: the owner's worker reached the approval check and refused for now.
    # Bounds for a busy machine (workers start torch and verify the plan first).
    waiting = re.compile(rf"awaiting approval: plan {digest[:16]}")
    server.wait_for_event("task_refused", worker="owner", reason=waiting, timeout=180)
    server.wait_for_event("awaiting_approval", round=1, worker="owner", timeout=60)
    # The owner's log names the command that shows the request, runnable as it stands.
    queued = owner.wait_for_event("plan_request_queued", plan=digest, timeout=60)
    hint = f"fed-worker requests --queue {shlex.quote(queued['queue'])} show {queued['request']}"
    assert hint in owner.output
    assert "pending" in _run_requests(capsys, *shlex.split(hint)[2:])
    assert server.popen.poll() is None
    assert owner.popen.poll() is None
    assert len(free.matching("training", model=f"plan-{digest}")) == 1
    assert owner.matching("training") == []

    assert "approved" in _requests(capsys, policy, "approve", digest[:12])
    assert server.wait(150) == 0, server.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    # Round 1 took the owner in once approved: both results, no refusal left in the record.
    assert [(row["round"], row["workers"], row["refused"]) for row in rows] == [
        (1, 2, {}),
        (2, 2, {}),
    ]
    assert owner.wait(60) == 0
    assert free.wait(60) == 0
    assert len(owner.matching("training", model=f"plan-{digest}")) == 2
