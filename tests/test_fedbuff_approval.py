"""Issue 27, trap 1 in FedBuff mode, through real processes: a worker whose data owner has not
approved the shipped plan is asked again with backoff while another worker keeps contributing;
it trains once approved, and a denial or no decision in time leaves it out (one federation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Proc, start_server, start_worker

from fedcore.worker.cli import main

pytestmark = pytest.mark.slow


def _policy(folder: Path) -> Path:
    """A data owner's policy that holds every plan for approval, its queue beside it."""
    folder.mkdir()
    policy = folder / "policy.toml"
    policy.write_text('[plans]\nrequire-approval = true\nrequests = "queue"\n')
    return policy


def _requests(capsys: pytest.CaptureFixture[str], policy: Path, *args: str) -> str:
    """``fed-worker requests --policy POLICY ARGS`` (in process: the owner's command line)."""
    capsys.readouterr()
    assert main(["requests", "--policy", str(policy), *args]) == 0
    return capsys.readouterr().out


def test_fedbuff_asks_a_waiting_silo_again_until_approved_and_leaves_it_out_once_denied(
    procs: list[Proc], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _policy(tmp_path / "owner")
    # Updates of a tiny model at one result per buffer (well under a second each): the
    # federation outlives the owners' decisions and is stopped at teardown. "silent"'s owner
    # never decides: it is left out after --approval-timeout.
    server, port = start_server(
        procs,
        "--strategy", "fedbuff", "--strategy-options", '{"buffer-size": 1}', "--model",
        "logreg", "--ship-plan", "--rounds", "100000", "--min-workers", "3", "--epochs", "1",
        "--batch-size", "32", "--lr", "0.05", "--approval-timeout", "20",
    )  # fmt: skip
    digest = str(server.wait_for_event("plan_shipped")["plan"])
    free = start_worker(procs, port, shards / "shard-0.npz", "free")
    owner = start_worker(procs, port, shards / "shard-1.npz", "owner", "--policy", str(policy))
    silent = start_worker(
        procs, port, shards / "shard-2.npz", "silent", "--policy", str(_policy(tmp_path / "s"))
    )
    # Positive control: the owner's worker reached the approval check and said "not yet".
    # Bounds for a busy machine (workers start torch and verify the plan first).
    waiting = re.compile(rf"awaiting approval: plan {digest[:16]}")
    server.wait_for_event("task_refused", worker="owner", reason=waiting, timeout=180)
    # Asked again with a growing delay. The owner approves at once: well within its 20 s,
    # however slowly a busy machine verifies the plan for the other workers.
    first = server.wait_for_event("awaiting_approval", worker="owner", timeout=60)
    second = server.wait_for_event("awaiting_approval", worker="owner", n=2, timeout=60)
    assert second["retry_in"] > first["retry_in"] > 0
    assert owner.matching("training") == []
    assert server.popen.poll() is None

    assert "approved" in _requests(capsys, policy, "approve", digest[:12])
    owner.wait_for_event("training", model=f"plan-{digest}", timeout=90)
    owner.wait_for_event("update_sent", timeout=60)
    # The other workers went on meanwhile ("silent" is still waiting on its owner).
    sent = len(free.matching("update_sent"))
    free.wait_for_event("update_sent", n=sent + 2, timeout=60)

    assert "denied" in _requests(capsys, policy, "deny", digest[:12], "--reason", "not ours")
    denied = re.compile(rf"plan {digest[:16]} was denied by the data owner: not ours")
    server.wait_for_event("worker_left_out", worker="owner", reason=denied, timeout=90)
    timed_out = re.compile(r"no decision on the plan within --approval-timeout 20 s")
    server.wait_for_event("worker_left_out", worker="silent", reason=timed_out, timeout=90)
    asked = [e["retry_in"] for e in server.matching("awaiting_approval", worker="silent")]
    assert len(asked) >= 2, asked
    assert asked[1] > asked[0], asked
    refusals = len(server.matching("task_refused"))
    sent = len(free.matching("update_sent"))
    free.wait_for_event("update_sent", n=sent + 3, timeout=60)
    # Left out: never asked again, and the federation goes on without them.
    assert len(server.matching("task_refused")) == refusals
    assert silent.matching("training") == []
    assert server.popen.poll() is None
