"""A FedBuff job on a standing network survives its coordinator (issue 24): real processes,
``fed-server --serve`` and two MNIST silos; the coordinator is killed with SIGKILL after two
global updates and restarted on the same state folder. The job resumes from its last
checkpointed update: every update is in its log exactly once, its bytes go on from what the
rounds before the kill moved (the job's bytes are the sum of its rounds'), and the epsilon
its rows show for each DP-SGD silo never goes down."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import forked
import pytest
from conftest import BIN, Proc, start_worker

import fedcore
from fedcore.jobs import JobHandle

pytestmark = pytest.mark.slow

ROUNDS = 6
JOB: dict[str, Any] = {
    "strategy": "fedbuff",
    "rounds": ROUNDS,
    "min_workers": 2,
    "model": "mnist-mlp",
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.05,
}


def _server(root: Path, listen: str, procs: list[Proc]) -> tuple[Proc, int]:
    command = [
        str(BIN / "fed-server"), "--listen", listen, "--serve",
        "--state-dir", str(root / "state"),
        "--scientists", str(root / "certs" / "scientists.json"),
        "--round-timeout", "60", "--log-json",
    ]  # fmt: skip
    proc = Proc(command, "fed-server")
    procs.append(proc)
    port = int(proc.wait_for_line(r"listening on [\d.]+:(\d+)", 120).group(1))
    return proc, port


@pytest.mark.timeout(300)
def test_a_fedbuff_job_resumes_after_a_sigkill_with_each_update_once(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    forked.run(
        [str(BIN / "fed-certs"), "add-scientist", "--dir", str(tmp_path / "certs"),
         "--study", "cardio", "alice"],
        check=True,
    )  # fmt: skip
    token = tmp_path / "certs" / "scientists" / "alice.token"
    server, port = _server(tmp_path, "127.0.0.1:0", procs)
    for i in range(2):
        # DP-SGD silos: each one's own accountant charges every task it starts.
        dpsgd = ["--dpsgd-noise-multiplier", "1.0", "--dpsgd-state", str(tmp_path / f"{i}.json")]
        start_worker(
            procs, port, shards / f"shard-{i}.npz", f"silo-{i}", "--give-up-after", "300", *dpsgd
        )
    server.wait_for_event("worker_joined", n=2, timeout=120)

    with fedcore.connect(f"127.0.0.1:{port}", token_file=token) as alice:
        job = alice.train("cardio", **JOB)
        # Update 2's second checkpoint is written after its report reached the job store.
        server.wait_for_event("checkpointed", round=2, n=2, timeout=120)
        before = job.status()
    # Positive control: the job ran FedBuff updates (not refused) and counted bytes.
    assert before.state == "running", before
    assert before.rounds_done >= 2
    assert before.bytes_sent > 0
    server.signal(signal.SIGKILL)
    server.wait(30)

    restarted, _ = _server(tmp_path, f"127.0.0.1:{port}", procs)
    restarted.wait_for_event("job_resumed", job=job.job_id, timeout=60)
    resumed_at = restarted.wait_for_event("resumed", timeout=60)["round"]
    assert resumed_at >= 2  # from the checkpoint, not from scratch
    with fedcore.connect(f"127.0.0.1:{port}", token_file=token) as alice:
        handle = JobHandle(alice.jobs, job.job_id)
        status = handle.wait(timeout=180)
        assert status.state == "completed", status
        assert status.rounds_done == ROUNDS
        rows = [json.loads(e.metrics_json) for e in alice.jobs.logs(job.job_id) if e.metrics_json]
        texts = [e.text for e in alice.jobs.logs(job.job_id)]
    # No update lost or doubled: each is in the log once, and FedBuff's own (staleness).
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["staleness"] is not None for r in rows)
    assert any("resumes from its checkpoint" in t for t in texts)
    # Only the updates after the checkpoint ran again.
    assert len(restarted.matching("round_completed")) == ROUNDS - resumed_at
    # The job's bytes went on across the restart: the sum of all its rounds', not of the
    # rounds after it.
    assert status.bytes_sent == sum(r["bytes_sent"] for r in rows)
    assert status.bytes_received == sum(r["bytes_received"] for r in rows)
    assert status.result["bytes"] == {"sent": status.bytes_sent, "received": status.bytes_received}
    after_restart = sum(r["bytes_sent"] for r in rows[resumed_at:])
    assert status.bytes_sent > after_restart
    assert status.bytes_sent >= before.bytes_sent
    # The DP-SGD silo's epsilon, as the rows show it, never goes down, across the restart too
    # (the checkpoint's rows carry it), and stays out of the averaged train metrics.
    for silo in ("silo-0", "silo-1"):
        shown = [r["privacy"]["silos"][silo]["epsilon"] for r in rows if silo in _silos(r)]
        assert shown, f"{silo} reported no epsilon"
        assert shown == sorted(shown)
        assert all(silo in _silos(r) for r in rows[len(rows) - len(shown) :])
    assert all("dpsgd_epsilon" not in r["train"] for r in rows)


def _silos(row: dict[str, Any]) -> dict[str, Any]:
    return dict((row.get("privacy") or {}).get("silos", {}))
