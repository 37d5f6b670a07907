"""A standing network through real processes (issue 24): one ``fed-server --serve``, three
MNIST silos and two analytics silos that join once, two data scientists in two studies.

The silos: ``silo-0`` and ``silo-1`` are tagged ``mnist`` and ``open`` and release models;
``silo-2`` is tagged ``mnist`` and ``owned``, releases models only from DP jobs and must approve every
plan; ``silo-3`` is tagged ``always`` only and its owner approves every job (``[jobs] approval =
"always"``). The tests share the network (module scope) and run in file order; the last one kills
the coordinator with SIGKILL and restarts it on the same state directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import forked
import pytest
from conftest import BIN, Proc

import fedcore
from fedcore.analytics.client import AnalyticsClient
from fedcore.jobs import JobError, JobHandle

pytestmark = pytest.mark.slow

MLP: dict[str, Any] = {"model": "mnist-mlp", "epochs": 1, "batch_size": 32, "learning_rate": 0.05}


@dataclass
class Network:
    root: Path
    port: int
    server: Proc
    started: list[Proc] = field(default_factory=list)

    def connect(self, who: str) -> AnalyticsClient:
        token = self.root / "certs" / "scientists" / f"{who}.token"
        return fedcore.connect(f"127.0.0.1:{self.port}", token_file=token)

    def start_server(self, listen: str) -> Proc:
        server = Proc(
            [
                str(BIN / "fed-server"),
                "--listen",
                listen,
                "--serve",
                "--state-dir",
                str(self.root / "state"),
                "--scientists",
                str(self.root / "certs" / "scientists.json"),
                "--max-running-jobs",
                "3",
                "--round-timeout",
                "60",
                # The approval test's job learns of the owner's decision within a second.
                "--approval-poll",
                "1",
                "--log-json",
            ],
            "fed-server",
        )
        self.started.append(server)
        self.port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 300).group(1))
        self.server = server
        return server


def _audit_verify(command: str, log: Path) -> subprocess.CompletedProcess[str]:
    return forked.run([str(BIN / command), "audit", "verify", str(log)])


def _table(root: Path, i: int) -> Path:
    rows = ["age,bmi"] + [f"{30 + (j * 7 + i) % 50},{20 + (j * 3) % 15}" for j in range(40)]
    (root / f"table{i}.csv").write_text("\n".join(rows) + "\n")
    (root / f"table{i}.meta.toml").write_text(
        'name = "cohort"\ntags = ["#cohort"]\n'
        '[[features]]\nname = "age"\ndtype = "float64"\nminimum = 0\nmaximum = 100\n'
        '[[features]]\nname = "bmi"\ndtype = "float64"\nminimum = 10\nmaximum = 60\n'
    )
    (root / f"tpolicy{i}.toml").write_text(
        f'[budget]\nstudy = "onco"\nepsilon = 5.0\ndelta = 1e-5\nledger = "tledger{i}.json"\n'
        "[analytics]\nmax-epsilon = 2.0\n"
        # Two silos share a query's noise here (the default asks for three).
        "[secure-aggregation]\nmin-group-size = 2\n"
    )
    return root / f"table{i}.csv"


@pytest.fixture(scope="module")
def network(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("network")
    for name, study in (("alice", "cardio"), ("bob", "onco")):
        forked.run(
            [str(BIN / "fed-certs"), "add-scientist", "--dir", str(root / "certs"), "--study", study, name],
            check=True,
        )  # fmt: skip
    net = Network(root, 0, None)  # type: ignore[arg-type]
    try:
        net.start_server("127.0.0.1:0")
        env = dict(os.environ, FEDCORE_ANALYTICS_EXACT_FOR_TESTS="1")
        for i in range(3):
            tags = '"#mnist", "#open"' if i < 2 else '"#mnist", "#owned"'
            (root / f"meta{i}.toml").write_text(f'name = "digits {i}"\ntags = [{tags}]\n')
            policy = (
                '[release]\nmodel = "allowed"\n'
                if i < 2
                else '[release]\nmodel = "dp-only"\n[plans]\nrequire-approval = true\n'
                'requests = "queue2"\n'
            )
            (root / f"policy{i}.toml").write_text(policy)
            args = [
                str(BIN / "fed-worker"), "--server", f"127.0.0.1:{net.port}",
                "--data", str(shards / f"shard-{i}.npz"), "--name", f"silo-{i}",
                "--threads", "1", "--metadata", str(root / f"meta{i}.toml"),
                "--policy", str(root / f"policy{i}.toml"),
                "--audit-log", str(root / f"audit-silo-{i}.log"),
                "--give-up-after", "600", "--log-json",
            ]  # fmt: skip
            net.started.append(Proc(args, f"silo-{i}"))
        (root / "meta3.toml").write_text('name = "digits 3"\ntags = ["#always"]\n')
        (root / "policy3.toml").write_text('[jobs]\napproval = "always"\n')
        args = [
            str(BIN / "fed-worker"), "--server", f"127.0.0.1:{net.port}",
            "--data", str(shards / "shard-0.npz"), "--name", "silo-3",
            "--threads", "1", "--metadata", str(root / "meta3.toml"),
            "--policy", str(root / "policy3.toml"), "--give-up-after", "600", "--log-json",
        ]  # fmt: skip
        net.started.append(Proc(args, "silo-3"))
        for i in range(2):
            args = [
                str(BIN / "fed-worker"), "--server", f"127.0.0.1:{net.port}",
                "--data", str(_table(root, i)), "--name", f"clinic-{i}",
                "--policy", str(root / f"tpolicy{i}.toml"),
            ]  # fmt: skip
            net.started.append(Proc(args, f"clinic-{i}", env=env))
        net.server.wait_for_event("worker_joined", n=6, timeout=400)
        yield net
    finally:
        for p in net.started:
            p.signal(signal.SIGKILL)
        for p in net.started:
            p.kill()


def _rounds_in_log(handle: JobHandle) -> list[int]:
    return [
        json.loads(e.metrics_json)["round"]
        for e in handle.client.logs(handle.job_id)
        if e.metrics_json
    ]


def test_two_scientists_run_two_training_jobs_and_a_query_that_complete(network: Network) -> None:
    with network.connect("alice") as alice, network.connect("bob") as bob:
        everyone = alice.train("cardio", rounds=2, min_workers=3, require_tags=["mnist"], **MLP)
        open_only = bob.train("onco", rounds=2, min_workers=2, require_tags=["open"], **MLP)
        query = bob.jobs.submit(
            "onco", {"query": "mean(age)", "epsilon": 1.0, "tags": ["cohort"]}, kind="query"
        )
        for handle in (everyone, open_only, query):
            status = handle.wait(timeout=300)
            assert status.state == "completed", status.message
        assert everyone.status().rounds_done == 2
        assert _rounds_in_log(everyone) == [1, 2]
        assert _rounds_in_log(open_only) == [1, 2]
        answer = query.status().result
        assert answer["statistic"] == "mean"
        assert {s["silo"] for s in answer["spent"]} == {"clinic-0", "clinic-1"}
    # The workers stayed: a job ends with JobEnd, never with a Shutdown.
    for proc in network.started[1:4]:
        assert proc.popen.poll() is None
        assert proc.matching("job_ended", reason=re.compile(r"^completed"))


def test_a_scientist_sees_and_stops_only_their_own_studies_jobs(network: Network) -> None:
    with network.connect("alice") as alice, network.connect("bob") as bob:
        mine = [j for j in alice.jobs.list() if j.scientist == "alice"]
        assert mine  # positive control: alice sees her job
        job_id = mine[0].job_id
        assert alice.jobs.status(job_id).study == "cardio"
        assert all(j.study == "onco" for j in bob.jobs.list())
        with pytest.raises(JobError, match="no job"):
            bob.jobs.status(job_id)
        with pytest.raises(JobError, match="no job"):
            bob.jobs.stop(job_id)
        with pytest.raises(JobError, match="no job"):
            list(bob.jobs.logs(job_id))
        with pytest.raises(JobError, match="not in study 'cardio'"):
            bob.train("cardio", rounds=1, **MLP)
        # Settings the network would refuse are refused at submission; nothing is imported.
        with pytest.raises(JobError, match="registered models"):
            alice.train("cardio", rounds=1, model="os:system")
    # The same through fed-job: bob's list holds no cardio job, his stop of one is refused.
    fed_job = [
        str(BIN / "fed-job"), "--server", f"127.0.0.1:{network.port}",
        "--token-file", str(network.root / "certs" / "scientists" / "bob.token"),
    ]  # fmt: skip
    listed = forked.run([*fed_job, "list"], check=True)
    assert " onco " in listed.stdout
    assert "cardio" not in listed.stdout
    stopped = forked.run([*fed_job, "stop", job_id])
    assert stopped.returncode == 2
    assert f"no job {job_id!r} in your studies" in stopped.stderr


def test_pull_needs_every_silos_release_policy(network: Network, tmp_path: Path) -> None:
    with network.connect("alice") as alice, network.connect("bob") as bob:
        everyone = next(j for j in alice.jobs.list() if j.kind == "train")
        with pytest.raises(JobError, match=r"silo-2 \(dp-only\)"):
            alice.jobs.pull(everyone.job_id)
        open_only = next(j for j in bob.jobs.list() if j.kind == "train")
        weights, rows = JobHandle(bob.jobs, open_only.job_id).pull(tmp_path / "model.safetensors")
        assert [r["round"] for r in rows] == [1, 2]
        assert weights
        assert (tmp_path / "model.safetensors").stat().st_size > 1000


def test_stop_ends_a_running_job_at_a_round_boundary(network: Network) -> None:
    with network.connect("alice") as alice:
        job = alice.train("cardio", rounds=200, min_workers=2, require_tags=["open"], **MLP)
        for row in job.metrics():
            if row["round"] >= 1:
                break
        job.stop()
        status = job.wait(timeout=120)
        assert status.state == "stopped"
        done = status.rounds_done
        assert 1 <= done < 200
        assert status.message == f"stopped after round {done}"
        assert _rounds_in_log(job) == list(range(1, done + 1))


def _log_line(handle: JobHandle, text: str, timeout: float = 300.0) -> str:
    """The first line of the job's log holding ``text`` (followed as it is written)."""
    for event in handle.client.logs(handle.job_id, follow=True, timeout=timeout):
        if text in event.text:
            return str(event.text)
    raise AssertionError(f"job {handle.job_id} ended without a log line holding {text!r}")


def _pending_request(requests: list[str]) -> str:
    """The id of the one pending request in the owner's queue (``fed-worker requests list``)."""
    listed = forked.run([*requests, "list"], check=True)
    pending = [line.split()[0] for line in listed.stdout.splitlines() if "  pending" in line]
    assert len(pending) == 1, listed.stdout
    return pending[0]


@pytest.mark.timeout(600)
def test_a_plan_waits_for_the_owners_approval_and_a_denial_ends_its_job(
    network: Network, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.bin"
    forked.run(
        [str(BIN / "fed-plan"), "export", "logreg", "--out", str(plan), "--input-shape", "1,28,28"],
        check=True,
    )
    policy = network.root / "policy2.toml"
    requests = [str(BIN / "fed-worker"), "requests", "--policy", str(policy)]
    with network.connect("alice") as alice:
        # Only silo-2 (its owner approves plans) is selected: nobody else trains meanwhile.
        terms = {"rounds": 1, "min_workers": 1, "require_tags": ["owned"], "batch_size": 16}
        approved = alice.train("cardio", plan_file=plan, learning_rate=0.05, **terms)
        waiting = _log_line(approved, "awaiting approval")
        assert waiting.startswith("awaiting approval at 1 of 1 silos (silo-2)")
        assert approved.status().state == "awaiting-approval"
        request_id = _pending_request(requests)
        forked.run([*requests, "approve", request_id], check=True)
        assert approved.wait(timeout=120).state == "completed"

        denied = alice.train("cardio", plan_file=plan, learning_rate=0.02, **terms)
        _log_line(denied, "awaiting approval")
        forked.run(
            [*requests, "deny", _pending_request(requests), "--reason", "not for our patients"],
            check=True,
        )
        status = denied.wait(timeout=120)
        assert status.state == "denied"
        assert "denied at silo silo-2" in status.message
        assert "not for our patients" in status.message


@pytest.mark.timeout(600)
def test_a_silo_that_approves_every_job_holds_it_until_its_owner_decides(network: Network) -> None:
    policy = network.root / "policy3.toml"
    requests = [str(BIN / "fed-worker"), "requests", "--policy", str(policy)]
    terms = {"rounds": 1, "min_workers": 1, "require_tags": ["always"], **MLP}
    with network.connect("alice") as alice:
        approved = alice.train("cardio", **terms)
        waiting = _log_line(approved, "awaiting approval")
        assert waiting.startswith("awaiting approval at 1 of 1 silos (silo-3)")
        assert approved.status().state == "awaiting-approval"
        # The owner's queue names the job, the scientist and the study (no plan: a model).
        listed = subprocess.run([*requests, "list"], check=True, capture_output=True, text=True)
        assert f"job {approved.job_id[:16]} by 'alice' (study 'cardio')" in listed.stdout
        subprocess.run(
            [*requests, "approve", _pending_request(requests)], check=True, capture_output=True
        )
        assert approved.wait(timeout=120).state == "completed"

        denied = alice.train("cardio", **terms)
        _log_line(denied, "awaiting approval")
        subprocess.run(
            [*requests, "deny", _pending_request(requests), "--reason", "not this month"],
            check=True,
            capture_output=True,
        )
        status = denied.wait(timeout=120)
        assert status.state == "denied", status.message
        assert "denied at silo silo-3" in status.message
        assert "not this month" in status.message


def test_audit_chains_verify_and_an_edited_line_is_caught(network: Network, tmp_path: Path) -> None:
    server_log = network.root / "state" / "audit.log"
    worker_log = network.root / "audit-silo-0.log"
    for command, log in (("fed-server", server_log), ("fed-worker", worker_log)):
        intact = _audit_verify(command, log)
        assert intact.returncode == 0, intact.stdout
        assert "chain intact" in intact.stdout
    events = [json.loads(line)["event"] for line in server_log.read_text().splitlines()]
    assert {"submitted", "ran", "completed", "stopped", "released", "release-refused"} <= set(
        events
    )
    lines = server_log.read_text().splitlines()
    middle = len(lines) // 2
    lines[middle] = lines[middle].replace('"scientist":"alice"', '"scientist":"mallory"', 1)
    if "mallory" not in lines[middle]:
        lines[middle] = lines[middle].replace('"job":"', '"job":"x', 1)
    tampered = tmp_path / "audit.log"
    tampered.write_text("\n".join(lines) + "\n")
    caught = _audit_verify("fed-server", tampered)
    assert caught.returncode == 1
    assert f"TAMPERED at line {middle + 1}" in caught.stdout


def test_a_killed_coordinator_resumes_its_job_with_no_round_lost_or_doubled(
    network: Network,
) -> None:
    with network.connect("alice") as alice:
        job = alice.train("cardio", rounds=8, min_workers=2, require_tags=["open"], **MLP)
        for row in job.metrics():
            if row["round"] >= 2:
                break
        network.server.signal(signal.SIGKILL)
        network.server.wait(30)
    restarted = network.start_server(f"127.0.0.1:{network.port}")
    restarted.wait_for_event("job_resumed", job=job.job_id)
    with network.connect("alice") as alice:
        resumed = JobHandle(alice.jobs, job.job_id)
        status = resumed.wait(timeout=240)
        assert status.state == "completed", status
        assert _rounds_in_log(resumed) == list(range(1, 9))
        texts = [e.text for e in alice.jobs.logs(job.job_id)]
        assert any("resumes from its checkpoint" in t for t in texts)
        assert status.rounds_done == 8
