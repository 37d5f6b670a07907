"""The consoles without a browser: sign-in, sessions, CSRF, escaping, headers, charts, and the
owner's and network views, driven in memory through the ASGI apps (browser tests:
tests/test_console_browser.py)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from console_asgi import Client

from fedcore.auditlog import AuditLog, verify
from fedcore.console import ConsoleSettings, add_console_flags, console_settings_from_args
from fedcore.console.app import MAX_FORM_BYTES
from fedcore.console.auth import SIGN_IN_FAILURES, SIGN_IN_FAILURES_ALL
from fedcore.console.headers import CSP
from fedcore.console.logbuffer import RecentLogs
from fedcore.console.svg import Point, Series, line_chart
from fedcore.enrollment import Enrollment, hash_token
from fedcore.errors import ConfigError
from fedcore.plan import TrainConfig
from fedcore.plans.queue import RequestQueue
from fedcore.policy import load_policy
from fedcore.policy.check import DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY
from fedcore.policy.ledger import Charge, PrivacyLedger
from fedcore.server.console import network_console
from fedcore.server.console_jobs import StandingNetworkView
from fedcore.server.console_view import FederationView
from fedcore.server.jobs.scheduler import RunnableJob, Scheduler
from fedcore.server.jobs.service import JobsService
from fedcore.server.jobs.store import JobRecord, JobStore
from fedcore.server.reporting.metrics import CoordinatorStatus, RoundMetrics
from fedcore.server.reporting.roster import ConnectedWorker
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.console import owner_console
from fedcore.worker.console_view import OwnerView
from fedcore.worker.runtime import RunningTask, WorkerState

PASSWORD = "correct horse battery staple"
HOSTILE = "<script>alert(1)</script>"


@dataclass
class FakeWorker:
    name: str = "hospital-a"
    server: str = "127.0.0.1:50051"
    state: WorkerState = WorkerState.WORKING
    worker_id: str | None = "w1"
    tasks_done: int = 3
    tasks_refused: int = 1
    current: RunningTask | None = None


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[plans]\nrequire-approval = true\nrequests = "queue"\n'
        '[budget]\nstudy = "mnist-2026"\nepsilon = 30.0\ndelta = 1e-5\nledger = "ledger.json"\n'
    )
    return path


def _submit(queue: RequestQueue, name: str, digest: str) -> str:
    """Queue a program as the worker does (the program is not a real graph: the owner's
    review then reports it fails verification; listing and deciding do not verify)."""
    train = TrainConfig(
        epochs=1,
        batch_size=8,
        optimizer="sgd",
        learning_rate=0.01,
        extra={DP_CLIP_KEY: 1.0, DP_NOISE_MULTIPLIER_KEY: 1.1},
    )
    task = pb.Task(kind=pb.TASK_KIND_FIT, round=4, train=train.to_proto())
    return queue.submit(pb.PlanProgram(name=name, hash=digest), task, coordinator="coord:50051").id


@pytest.fixture
def owner(policy_file: Path) -> tuple[Client, RequestQueue, str]:
    policy = load_policy(policy_file)
    assert policy.plans.requests is not None
    assert policy.budget is not None
    queue = RequestQueue(policy.plans.requests)
    rid = _submit(queue, HOSTILE, "ab" * 32)
    ledger = PrivacyLedger(policy.budget.ledger, study=policy.budget.study)
    for i in (1, 2):
        ledger.spend([Charge(1.0, what=f"round {i}: client-level DP")], delta=1e-5, budget=30)
    view = OwnerView(queue=queue, policy=policy, worker=FakeWorker(), dataset=None)
    app = owner_console(ConsoleSettings("127.0.0.1:0", PASSWORD), view).app()
    return Client(app), queue, rid


# ---------------------------------------------------------------------- sign-in


async def test_every_page_needs_sign_in_and_signing_in_issues_a_new_session(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, _, rid = owner
    for path in ("/", "/requests", f"/requests/{rid}", "/ledger", "/audit", "/dataset"):
        reply = await client.get(path)
        assert (reply.status, reply.headers["location"]) == (303, "/login"), path
    before = dict(client.cookies)
    wrong = await client.sign_in("not the password")
    assert wrong.status == 403
    assert "wrong password" in wrong.body
    signed = await client.sign_in(PASSWORD)
    assert signed.status == 303
    assert client.cookies != before  # a new session id: no fixation
    assert (await client.get("/")).status == 200


async def test_failed_sign_ins_are_throttled(owner: tuple[Client, RequestQueue, str]) -> None:
    client, _, _ = owner
    for _ in range(SIGN_IN_FAILURES):
        assert (await client.sign_in("guess")).status == 403
    assert (await client.sign_in(PASSWORD)).status == 429
    assert (await client.get("/")).status == 303


async def test_a_guesser_elsewhere_does_not_lock_the_owner_out(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    guesser, _, _ = owner
    owner_client = Client(guesser.app, address="10.0.0.2")
    guesser.address = "10.0.0.66"
    for _ in range(SIGN_IN_FAILURES):
        assert (await guesser.sign_in("guess")).status == 403
    assert (await guesser.sign_in(PASSWORD)).status == 429  # control: the guesser is throttled
    assert (await owner_client.sign_in(PASSWORD)).status == 303
    assert (await owner_client.get("/")).status == 200


async def test_guessing_from_many_addresses_is_throttled_for_all(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, _, _ = owner
    per_address = SIGN_IN_FAILURES - 1  # no single address reaches its own limit
    guessers = [
        Client(client.app, address=f"10.1.0.{i}")
        for i in range(-(-SIGN_IN_FAILURES_ALL // per_address))
    ]
    failed = 0
    for guesser in guessers:
        for _ in range(per_address):
            if failed == SIGN_IN_FAILURES_ALL:
                break
            assert (await guesser.sign_in("guess")).status == 403
            failed += 1
    assert (await Client(client.app, address="10.2.0.1").sign_in(PASSWORD)).status == 429


async def test_sign_in_without_the_csrf_token_is_refused(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, _, _ = owner
    await client.get("/login")
    reply = await client.post("/login", {"password": PASSWORD})
    assert reply.status == 403
    assert "CSRF" in reply.body
    assert (await client.get("/")).status == 303


async def test_an_oversized_sign_out_form_is_refused_as_any_other_form(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    """Sign-in, sign-out and actions read a form one way: a form past MAX_FORM_BYTES is a 413
    at /logout too (it was an unhandled error there), and the session stays signed in."""
    client, _, _ = owner
    assert (await client.sign_in(PASSWORD)).status == 303
    csrf = (await client.get("/")).csrf
    huge = await client.post("/logout", {"csrf": csrf, "pad": "x" * (MAX_FORM_BYTES + 1)})
    assert huge.status == 413
    assert (await client.get("/")).status == 200
    # Positive control: the same form without the padding signs out.
    assert (await client.post("/logout", {"csrf": csrf})).status == 303
    assert (await client.get("/")).status == 303


async def test_cookie_and_security_headers(owner: tuple[Client, RequestQueue, str]) -> None:
    client, _, _ = owner
    reply = await client.get("/login")
    assert reply.headers["content-security-policy"] == CSP
    assert "script-src" not in CSP
    assert "default-src 'none'" in CSP
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-store"
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie


async def test_a_rebound_host_name_is_refused(owner: tuple[Client, RequestQueue, str]) -> None:
    client, _, _ = owner
    assert (await client.get("/login")).status == 200
    assert (await client.get("/login", host="attacker.example:8080")).status == 400


# ---------------------------------------------------------------------- actions


async def test_a_decision_without_the_csrf_token_is_refused_and_with_it_is_written(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, queue, rid = owner
    await client.sign_in(PASSWORD)
    page = await client.get(f"/requests/{rid}")
    refused = await client.post(f"/requests/{rid}/deny", {"reason": "replayed"})
    assert refused.status == 403
    forged = await client.post(f"/requests/{rid}/deny", {"reason": "x", "csrf": "forged"})
    assert forged.status == 403
    record = queue.get(rid)
    assert record is not None
    assert record.status == "pending"
    # Positive control: the same action with the session's token is the owner's decision.
    done = await client.post(f"/requests/{rid}/deny", {"reason": "not for us", "csrf": page.csrf})
    assert done.status == 303
    record = queue.get(rid)
    assert record is not None
    assert (record.status, record.reason) == ("denied", "not for us")
    shown = await client.get(f"/requests/{rid}")
    assert "denied: not for us" in shown.body  # the flash message


async def test_an_approval_bounds_rounds_and_learning_rates_as_the_cli_does(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, queue, rid = owner
    await client.sign_in(PASSWORD)
    csrf = (await client.get(f"/requests/{rid}")).csrf
    bad = await client.post(f"/requests/{rid}/approve", {"csrf": csrf, "rounds": "0"})
    assert bad.status == 303
    assert "nothing was decided" in (await client.get(f"/requests/{rid}")).body
    await client.post(
        f"/requests/{rid}/approve",
        {"csrf": csrf, "rounds": "5", "lr_low": "0.005", "lr_high": "0.02"},
    )
    record = queue.get(rid)
    assert record is not None
    assert (record.status, record.rounds, record.lr_range) == ("approved", 5, (0.005, 0.02))


# ---------------------------------------------------------------------- what is shown


async def test_a_hostile_plan_name_is_shown_as_text(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, _, rid = owner
    await client.sign_in(PASSWORD)
    for path in ("/requests", f"/requests/{rid}", "/", "/audit"):
        body = (await client.get(path)).body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path  # shown ...
        assert "<script" not in body, path  # ... never as markup


async def test_the_review_states_the_terms_in_words(
    owner: tuple[Client, RequestQueue, str],
) -> None:
    client, _, rid = owner
    await client.sign_in(PASSWORD)
    body = (await client.get(f"/requests/{rid}")).body
    assert "train 1 local epoch(s) per round" in body
    assert "clipped to L2 norm 1, Gaussian noise of multiplier 1.1" in body
    assert "in the clear: the coordinator sees this silo" in body
    assert "mnist-2026 (budget epsilon 30 at delta 1e-05)" in body
    assert "the coordinator at coord:50051" in body
    assert "ab" * 32 in body
    # Not a real program: the review says so rather than showing an unverified description.
    assert "fails verification here" in body


async def test_the_ledger_chart_plots_each_charge_under_the_budget(
    owner: tuple[Client, RequestQueue, str], policy_file: Path
) -> None:
    client, _, _ = owner
    await client.sign_in(PASSWORD)
    body = (await client.get("/ledger")).body
    assert 'data-points="2"' in body
    assert "budget 30" in body
    assert "round 2: client-level DP" in body
    budget = load_policy(policy_file).budget
    assert budget is not None
    PrivacyLedger(budget.ledger, study=budget.study).spend(
        [Charge(1.0, what="round 3: client-level DP")], delta=1e-5, budget=30
    )
    assert 'data-points="3"' in (await client.get("/ledger")).body


async def test_the_audit_log_is_searchable(owner: tuple[Client, RequestQueue, str]) -> None:
    client, queue, rid = owner
    await client.sign_in(PASSWORD)
    queue.decide(rid, approve=False, reason="wrong study")
    everything = (await client.get("/audit")).body
    assert "wrong study" in everything
    assert "round 1: client-level DP" in everything
    found = (await client.get("/audit?q=WRONG+study")).body
    assert "wrong study" in found
    assert "client-level DP" not in found


async def test_the_overview_shows_the_current_task(
    policy_file: Path,
) -> None:
    worker = FakeWorker(current=RunningTask(7, "fit", 0.0))
    view = OwnerView(queue=None, policy=load_policy(policy_file), worker=worker, dataset=None)
    client = Client(owner_console(ConsoleSettings("127.0.0.1:0", PASSWORD), view).app())
    await client.sign_in(PASSWORD)
    body = (await client.get("/")).body
    assert "round 7: fit" in body
    assert "3 done, 1 refused" in body
    assert "does not ask for approvals" in body


async def test_the_audit_page_reads_the_hash_chained_log_and_says_whether_it_verifies(
    policy_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("ran", job="job-1", round=1, kind="fit", model=HOSTILE)
    log.append("refused", job="job-2", round=1, kind="fit", reason="not in the allow-list")
    log.append("job-ended", job="job-1", reason="completed")
    view = OwnerView(
        queue=None,
        policy=load_policy(policy_file),
        worker=FakeWorker(),
        dataset=None,
        audit_log=path,
    )
    client = Client(owner_console(ConsoleSettings("127.0.0.1:0", PASSWORD), view).app())
    await client.sign_in(PASSWORD)
    # Positive control: the intact log verifies, and every entry is listed, markup as text.
    page = (await client.get("/audit")).body
    assert "Chain verifies: 3 entries" in page
    assert "not in the allow-list" in page
    assert "&lt;script&gt;" in page
    assert "<script" not in page
    found = (await client.get("/audit?q=ALLOW-LIST")).body
    assert "not in the allow-list" in found
    assert "job-ended" not in found
    # An edit in the middle: the banner names the entry fed-worker audit verify names.
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("not in the allow-list", "allowed")
    path.write_text("\n".join(lines) + "\n")
    count, problem = verify(path)
    assert problem is not None
    broken = (await client.get("/audit")).body
    assert f"Chain BROKEN at entry {problem.line}:" in broken
    assert problem.line == 2
    assert count == 1
    assert "audit log #2 (unverified)" in broken
    # A log the worker cannot read is not "intact".
    path.unlink()
    path.mkdir()
    unreadable = (await client.get("/audit")).body
    assert "Chain BROKEN at entry 1: the file cannot be read" in unreadable


# ---------------------------------------------------------------------- network console


def _metrics(n: int) -> RoundMetrics:
    return RoundMetrics(
        round=n,
        workers=2,
        failures=0,
        duration_s=1.0,
        bytes_sent=1000 * n,
        bytes_received=900 * n,
        accuracy=0.5 + 0.1 * n,
        loss=1.0 / n,
        epsilon=0.5 * n,
        refused={HOSTILE: "awaiting approval"},
    )


async def test_the_network_console_shows_workers_rounds_and_logs() -> None:
    logs = RecentLogs()
    worker = ConnectedWorker("w1", HOSTILE, 400, "ready", None, ())
    view = FederationView("logreg · fedavg", lambda: [worker], logs)
    status = CoordinatorStatus("training", 3, 10, 1, 1, 0, 1, 3000, 2700, 3.0, None, 2)
    view.update(status)
    view.round_completed(_metrics(1))
    view.round_completed(_metrics(2))
    logs.emit(_record("round 2: worker 'x' refused its task"))
    client = Client(
        network_console(ConsoleSettings("127.0.0.1:0", PASSWORD), view, title="t").app()
    )
    assert (await client.get("/")).status == 303
    await client.sign_in(PASSWORD)
    overview = (await client.get("/")).body
    assert "&lt;script&gt;" in overview
    assert "<script" not in overview
    assert "2 of 10" in overview
    job = (await client.get("/jobs/federation")).body
    assert len(re.findall(r'<svg class="chart"', job)) == 4  # accuracy, loss, bytes, epsilon
    assert 'data-points="2"' in job
    assert "<script" not in job
    assert (await client.get("/jobs/other")).status == 404
    assert "refused its task" in (await client.get("/logs?q=refused")).body
    assert "refused its task" not in (await client.get("/logs?q=nothing-like-it")).body


# ---------------------------------------------------------------------- a standing network

ALICE, BOB = "alice-token-" + "a" * 20, "bob-token-" + "b" * 20


@dataclass
class Network:
    """A standing network's console over a real job store, enrolment and Jobs service (no
    gRPC, no workers): alice works in study-a (and the markup-named study), bob in study-b."""

    client: Client
    store: JobStore
    audit: Path
    scientists: Path
    job_a: str
    job_b: str
    hostile: str


def _enrol(path: Path, *, alice_revoked: bool = False) -> None:
    entries = {
        "alice": {
            "token_sha256": hash_token(ALICE),
            "studies": ["study-a", HOSTILE],
            "revoked": alice_revoked,
        },
        "bob": {"token_sha256": hash_token(BOB), "studies": ["study-b"]},
    }
    path.write_text(json.dumps({"version": 1, "scientists": entries}))


def _no_job(record: JobRecord) -> RunnableJob:
    raise AssertionError("the console tests run no job")


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    store = JobStore(tmp_path / "jobs.db")
    scientists = tmp_path / "scientists.json"
    _enrol(scientists)
    audit = tmp_path / "audit.log"
    service = JobsService(
        store,
        Scheduler(store, _no_job, 1),
        Enrollment(scientists, section="scientists"),
        AuditLog(audit),
        tmp_path,
        1 << 20,
        lambda settings: None,
    )
    a = store.submit(
        study="study-a", scientist="alice", kind="train", settings={"model": "mlp"}, rounds=5
    )
    for n in (1, 2):
        store.record_round(a.id, n, f"round {n} completed", json.dumps(_metrics(n).to_json()))
    store.set_state(a.id, "awaiting-approval", "awaiting approval at 1 of 2 silos (hospital-b)")
    b = store.submit(
        study="study-b", scientist="bob", kind="train", settings={"model": "cnn"}, rounds=3
    )
    hostile = store.submit(
        study=HOSTILE, scientist="alice", kind="train", settings={"model": HOSTILE}, rounds=1
    )
    logs = RecentLogs()
    worker = ConnectedWorker("w1", "hospital-a", 400, "ready", None, ())
    view = StandingNetworkView(
        store, service.scientists, service.request_stop, lambda: [worker], logs
    )
    console = network_console(
        ConsoleSettings("127.0.0.1:0", PASSWORD), view, title="t", scientists=view
    )
    yield Network(Client(console.app()), store, audit, scientists, a.id, b.id, hostile.id)
    store.close()


async def test_a_scientist_signs_in_with_their_token_and_sees_only_their_studies(
    network: Network,
) -> None:
    client = network.client
    assert (await client.sign_in("not a token nor the password")).status == 403
    assert (await client.sign_in(ALICE)).status == 303
    overview = (await client.get("/")).body
    assert "signed in as alice" in overview
    # Positive control: alice's own job is listed and its page shows its charts and log.
    assert network.job_a in overview
    job = await client.get(f"/jobs/{network.job_a}")
    assert job.status == 200
    assert len(re.findall(r'<svg class="chart"', job.body)) == 4
    assert 'data-points="2"' in job.body
    assert "awaiting approval at 1 of 2 silos" in job.body
    assert "round 2 completed" in job.body  # the job's own log
    # Bob's job: not listed, and its URL is as absent as a job that does not exist.
    assert network.job_b not in overview
    other = await client.get(f"/jobs/{network.job_b}")
    missing = await client.get("/jobs/000000000000")
    assert (other.status, other.body) == (missing.status, missing.body) == (404, "no such job")
    # The network's workers and process logs are the operator's.
    assert 'href="/workers"' not in overview
    assert "hospital-a" not in overview
    assert "1 worker(s) connected" in overview
    assert (await client.get("/workers")).status == 404
    assert (await client.get("/logs")).status == 404


async def test_the_operator_sees_every_job_and_the_workers(network: Network) -> None:
    client = network.client
    await client.sign_in(PASSWORD)
    overview = (await client.get("/")).body
    assert network.job_a in overview
    assert network.job_b in overview
    assert "hospital-a" in overview
    assert (await client.get(f"/jobs/{network.job_b}")).status == 200
    assert (await client.get("/workers")).status == 200
    # No stop for the operator: it is a scientist's action (fed-job stop).
    assert "Stop this job" not in (await client.get(f"/jobs/{network.job_a}")).body


async def test_job_and_study_names_carrying_markup_are_shown_as_text(network: Network) -> None:
    client = network.client
    await client.sign_in(ALICE)
    for path in ("/", f"/jobs/{network.hostile}"):
        body = (await client.get(path)).body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path  # shown ...
        assert "<script" not in body, path  # ... never as markup


async def test_stopping_a_job_needs_the_csrf_token_and_its_own_scientist(
    network: Network,
) -> None:
    client, store = network.client, network.store
    await client.sign_in(ALICE)
    page = await client.get(f"/jobs/{network.job_a}")
    assert "Stop this job" in page.body
    assert (await client.post(f"/jobs/{network.job_a}/stop", {})).status == 403
    forged = await client.post(f"/jobs/{network.job_a}/stop", {"csrf": "forged"})
    assert forged.status == 403
    assert store.get(network.job_a).state == "awaiting-approval"
    # Another study's job cannot be stopped, nor told apart from none, with a valid token.
    other = await client.post(f"/jobs/{network.job_b}/stop", {"csrf": page.csrf})
    assert other.status == 404
    assert store.get(network.job_b).state == "queued"
    # Positive control: the same request with the session's token stops alice's job, through
    # the Jobs service's own stop (audited like fed-job stop).
    done = await client.post(f"/jobs/{network.job_a}/stop", {"csrf": page.csrf})
    assert done.status == 303
    assert store.get(network.job_a).stop_requested
    assert "stop requested" in (await client.get(f"/jobs/{network.job_a}")).body
    entries = [json.loads(line) for line in network.audit.read_text().splitlines()]
    assert [(e["event"], e["scientist"]) for e in entries] == [("stop-requested", "alice")]
    assert verify(network.audit) == (1, None)


async def test_a_colleague_and_the_operator_cannot_stop_from_the_console(
    network: Network,
) -> None:
    # bob joins study-a: he sees alice's job, but the console's stop is its own scientist's.
    entries = json.loads(network.scientists.read_text())
    entries["scientists"]["bob"]["studies"] = ["study-a", "study-b"]
    network.scientists.write_text(json.dumps(entries))
    client = network.client
    await client.sign_in(BOB)
    page = await client.get(f"/jobs/{network.job_a}")
    assert page.status == 200
    assert "Stop this job" not in page.body
    refused = await client.post(f"/jobs/{network.job_a}/stop", {"csrf": page.csrf})
    assert refused.status == 403
    assert not network.store.get(network.job_a).stop_requested


async def test_wrong_tokens_are_throttled_with_the_password(network: Network) -> None:
    client = network.client
    for _ in range(SIGN_IN_FAILURES):
        assert (await client.sign_in("alice-token-guess")).status == 403
    assert (await client.sign_in(ALICE)).status == 429
    assert (await client.get("/")).status == 303


async def test_a_revoked_scientist_is_signed_out_at_their_next_page(network: Network) -> None:
    client = network.client
    await client.sign_in(ALICE)
    assert (await client.get("/")).status == 200
    _enrol(network.scientists, alice_revoked=True)
    # No wait: the enrolment is re-read at the next page, as it changed on disk.
    assert (await client.get(f"/jobs/{network.job_a}")).status == 303
    assert (await client.get("/")).headers["location"] == "/login"
    assert (await client.sign_in(ALICE)).status == 403


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("fedcore.server", logging.WARNING, __file__, 1, message, None, None)


# ---------------------------------------------------------------------- settings and charts


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_console_flags(parser, what="test")
    return parser.parse_args(argv)


def test_console_settings_refuse_what_is_unsafe(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    settings = console_settings_from_args(
        _parse("--console", "127.0.0.1:0", "--console-password-file", str(secret))
    )
    assert settings is not None
    assert settings.password == PASSWORD
    assert not settings.tls
    assert console_settings_from_args(_parse()) is None
    with pytest.raises(ConfigError, match="needs --console-password-file"):
        console_settings_from_args(_parse("--console", "127.0.0.1:0"))
    with pytest.raises(ConfigError, match="without TLS"):
        console_settings_from_args(
            _parse("--console", "0.0.0.0:8080", "--console-password-file", str(secret))
        )
    short = tmp_path / "short"
    short.write_text("hunter2")
    with pytest.raises(ConfigError, match="fewer than"):
        console_settings_from_args(
            _parse("--console", "127.0.0.1:0", "--console-password-file", str(short))
        )


def test_charts_escape_labels_and_drop_non_finite_values() -> None:
    svg = line_chart(
        [Series(HOSTILE, (Point(1, 1.0, HOSTILE), Point(2, float("nan")), Point(3, 2.0)))],
        title=HOSTILE,
        x_label="round",
        y_label="y",
        limit=("budget", 8.0),
        show_labels=True,
    )
    assert "<script" not in svg
    assert "&lt;script&gt;" in svg
    assert 'data-points="2"' in svg
    assert "budget 8" in svg
    assert 'data-points="0"' in line_chart([], title="t", x_label="x", y_label="y")


def test_the_clis_load_the_web_stack_only_with_console() -> None:
    """A worker or coordinator without --console pays nothing for the consoles at start-up."""
    code = (
        "import sys, fedcore.server.cli, fedcore.worker.cli\n"
        "web = ('starlette', 'jinja2', 'uvicorn')\n"
        "print(sorted(m for m in web if m in sys.modules))\n"
        "import fedcore.worker.console, fedcore.server.console\n"
        "print(sorted(m for m in web if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "['jinja2', 'starlette', 'uvicorn']"  # positive control
