"""The consoles in a real browser (the system's headless Chromium, driven by Playwright) over
one real federation: a coordinator with ``--console``, a worker trained freely, and a worker
whose data owner approves plans in its ``--console``; and over a standing network
(``fed-server --serve --console``, one silo) where a data scientist signs in with their
token, follows the job they submitted with ``fed-job submit`` and stops it.

Set ``FEDCORE_CONSOLE_SCREENSHOTS=docs/img`` to write the docs' screenshots.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BIN, Proc

import fedcore
from fedcore.jobs import JobHandle
from fedcore.plan import TrainConfig
from fedcore.plans.format import plan_hash
from fedcore.plans.queue import RequestQueue
from fedcore.policy import load_policy
from fedcore.v1 import fedcore_pb2 as pb

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium; "
        ".ci/run does) to run the consoles' browser tests",
        allow_module_level=True,
    )

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Dialog,
    Page,
    sync_playwright,
)

PASSWORD = "correct horse battery staple"
HOSTILE = "<script>alert('xss')</script>"
SHOTS = os.environ.get("FEDCORE_CONSOLE_SCREENSHOTS")
_TIMEOUT_S = 120


@dataclass
class Federation:
    server: Proc
    owner: Proc
    free: Proc
    server_console: str
    owner_console: str
    policy: Path
    digest: str


@pytest.fixture(scope="module")
def federation(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("consoles")
    secret = root / "console-password"
    secret.write_text(PASSWORD)
    policy = root / "policy.toml"
    policy.write_text(
        '[plans]\nrequire-approval = true\nrequests = "plan-requests"\n'
        '[budget]\nstudy = "mnist-2026"\nepsilon = 60.0\ndelta = 1e-5\n'
        'ledger = "privacy-ledger.json"\n'
    )
    console = ["--console", "127.0.0.1:0", "--console-password-file", str(secret)]
    started: list[Proc] = []
    try:
        # Rounds of a tiny model with client-level DP (charged to the owner's ledger); one
        # result per round is enough, so rounds go on while the owner's plan waits. The
        # federation outlives the tests and is stopped at teardown.
        server = Proc(
            [
                str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--model", "logreg",
                "--ship-plan", "--rounds", "5000", "--min-workers", "2", "--min-results", "1",
                "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
                "--dp-noise-multiplier", "1.0", "--dp-clip", "0.05",
                "--eval-data", str(shards / "test.npz"), "--fed-eval-every", "0", *console,
                "--log-json",
            ],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        server_console = server.wait_for_line(r"console on (http://\S+)", _TIMEOUT_S).group(1)
        port = server.wait_for_line(r"listening on [\d.]+:(\d+)", _TIMEOUT_S).group(1)
        digest = str(server.wait_for_event("plan_shipped")["plan"])
        worker = [
            str(BIN / "fed-worker"), "--server", f"127.0.0.1:{port}", "--threads", "1",
            "--log-json",
        ]  # fmt: skip
        free = Proc([*worker, "--data", str(shards / "shard-0.npz"), "--name", "free"], "free")
        started.append(free)
        owner = Proc(
            [
                *worker, "--data", str(shards / "shard-1.npz"), "--name", "owner",
                "--policy", str(policy), "--audit-log", str(root / "audit.log"), *console,
            ],
            "owner",
        )  # fmt: skip
        started.append(owner)
        owner_console = owner.wait_for_line(r"console on (http://\S+)", _TIMEOUT_S).group(1)
        awaiting = re.compile("awaiting approval")
        server.wait_for_event("task_refused", worker="owner", reason=awaiting, timeout=_TIMEOUT_S)
        yield Federation(server, owner, free, server_console, owner_console, policy, digest)
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
        for p in started:
            p.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport={"width": 1200, "height": 860})
    made.set_default_timeout(_TIMEOUT_S * 1000)
    yield made
    made.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    opened = context.new_page()
    dialogs: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    opened.on("dialog", dismiss)
    yield opened
    assert not dialogs, f"a page ran script: {dialogs}"
    opened.close()


def _shot(page: Page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def _sign_in(page: Page, base: str) -> None:
    page.goto(base)
    if page.url.endswith("/login"):
        page.fill("input[name=password]", PASSWORD)
        page.click("form.login button")
    assert not page.url.endswith("/login"), page.content()


def _points(page: Page, selector: str = "svg.chart") -> int:
    return int(page.locator(selector).first.get_attribute("data-points") or 0)


def _queue_renamed(fed: Federation, name: str) -> str:
    """Queue the shipped program renamed ``name``, as the worker queues what a coordinator
    sends (the name is the coordinator's to choose, and printable text passes the verifier)."""
    rules = load_policy(fed.policy).plans
    assert rules.requests is not None
    queue = RequestQueue(rules.requests)
    program = pb.PlanProgram()
    program.CopyFrom(queue.program(fed.digest))
    program.name = name
    program.hash = plan_hash(program)
    train = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.05)
    task = pb.Task(kind=pb.TASK_KIND_FIT, round=1, train=train.to_proto())
    return queue.submit(program, task, coordinator="127.0.0.1").id


def _open_logreg_request(page: Page, fed: Federation) -> None:
    page.goto(fed.owner_console + "requests")
    page.locator("tr.request a.plan-name", has_text=re.compile(r"^logreg$")).first.click()
    page.wait_for_selector("#summary")


# ---------------------------------------------------------------------- the data owner


def test_sign_in_approve_a_pending_plan_and_the_federation_proceeds_and_is_charged(
    page: Page, federation: Federation
) -> None:
    fed = federation
    page.goto(fed.owner_console + "requests")
    assert page.url.endswith("/login")  # nothing without signing in
    _sign_in(page, fed.owner_console)
    _shot(page, "console-owner-overview.png")
    page.goto(fed.owner_console + "ledger")
    charged_before = _points(page)
    _open_logreg_request(page, fed)
    summary = page.locator("#summary").inner_text()
    assert "What leaves the silo" in summary
    assert (
        "client-level: each update clipped to L2 norm 0.05, Gaussian noise of multiplier 1"
        in summary
    )
    assert fed.digest in summary
    _shot(page, "console-owner-request.png")
    trained = len(fed.owner.matching("training", model=f"plan-{fed.digest}"))
    page.click("#approve button")
    assert page.locator("#status").inner_text() == "approved"
    # The federation proceeds with the owner: it trains the plan, round after round.
    fed.owner.wait_for_event(
        "training", n=trained + 3, model=f"plan-{fed.digest}", timeout=_TIMEOUT_S
    )
    # A charge is written before the update it pays for leaves: once a round's training
    # started, the round before it is charged.
    page.goto(fed.owner_console + "ledger")
    assert _points(page) > charged_before
    _shot(page, "console-owner-ledger.png")
    # The audit page reads the worker's hash-chained log: the refusal while the plan waited,
    # the rounds it ran since, and the chain verified as `fed-worker audit verify` does.
    page.goto(fed.owner_console + "audit?q=plan-")
    assert page.locator("#chain").inner_text().startswith("Chain verifies:")
    assert page.locator("#audit tr.event.refused").count() >= 1
    assert page.locator("#audit tr.event.ran").count() >= 1
    _shot(page, "console-owner-audit.png")


def test_deny_with_a_reason_that_reaches_the_coordinator(
    page: Page, federation: Federation
) -> None:
    fed = federation
    _sign_in(page, fed.owner_console)
    _open_logreg_request(page, fed)
    page.fill("#deny input[name=reason]", "not for our patients")
    page.click("#deny button")
    assert page.locator("#status").inner_text() == "denied"
    denied = re.compile(
        rf"plan {fed.digest[:16]} was denied by the data owner: not for our patients"
    )
    fed.server.wait_for_event("task_refused", worker="owner", reason=denied, timeout=_TIMEOUT_S)


def test_a_plan_named_with_a_script_is_rendered_inert(page: Page, federation: Federation) -> None:
    rid = _queue_renamed(federation, HOSTILE)
    _sign_in(page, federation.owner_console)
    page.goto(federation.owner_console + "requests")
    link = page.locator(f'a[href="/requests/{rid}"]')
    assert link.inner_text() == HOSTILE  # shown as the text it is ...
    assert page.locator("script").count() == 0  # ... never as an element
    link.click()
    assert f"{HOSTILE} (hash" in page.locator("#summary").inner_text()  # verified, as text
    assert page.locator("script").count() == 0
    # (the page fixture fails the test if any dialog opened)


def test_an_action_replayed_without_its_csrf_token_is_refused(
    page: Page, federation: Federation
) -> None:
    rid = _queue_renamed(federation, "replay target")
    _sign_in(page, federation.owner_console)
    page.goto(federation.owner_console + f"requests/{rid}")
    url = federation.owner_console + f"requests/{rid}/approve"
    # The browser's own session cookie goes with it: only the token is missing or wrong.
    assert page.request.post(url, form={"rounds": ""}).status == 403
    assert page.request.post(url, form={"rounds": "", "csrf": "guessed"}).status == 403
    page.reload()
    assert page.locator("#status").inner_text() == "pending"
    # Positive control: the same request with the page's token is the owner's decision.
    token = page.locator("#approve input[name=csrf]").get_attribute("value") or ""
    assert page.request.post(url, form={"rounds": "", "csrf": token}).ok
    page.reload()
    assert page.locator("#status").inner_text() == "approved"


# ---------------------------------------------------------------------- the network


def test_the_network_console_shows_workers_rounds_and_logs(
    page: Page, federation: Federation
) -> None:
    fed = federation
    fed.server.wait_for_event("round_completed", round=1, timeout=_TIMEOUT_S)
    page.goto(fed.server_console)
    assert page.url.endswith("/login")
    _sign_in(page, fed.server_console)
    workers = page.locator("#workers").inner_text()
    assert "owner" in workers
    assert "free" in workers
    _shot(page, "console-network-overview.png")
    page.click("#jobs a")
    assert page.locator("svg.chart").count() == 4  # accuracy, loss, bytes, epsilon
    assert _points(page) > 0
    _shot(page, "console-network-job.png")
    page.goto(fed.server_console + "logs?q=awaiting+approval")
    assert "'owner' refused" in page.locator("#logs").inner_text()


# ---------------------------------------------------------------------- a standing network


@dataclass
class Standing:
    console: str
    port: int
    certs: Path
    alice_job: str
    bob_job: str


def _fed_job(port: int, certs: Path, who: str, *args: str) -> str:
    token = certs / "scientists" / f"{who}.token"
    return subprocess.run(
        [str(BIN / "fed-job"), "--server", f"127.0.0.1:{port}", "--token-file", str(token),
         "--json", *args],
        check=True, capture_output=True, text=True, timeout=_TIMEOUT_S,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def standing(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standing]:
    root = tmp_path_factory.mktemp("standing")
    certs = root / "certs"
    for name, study in (("alice", "cardio"), ("bob", "onco")):
        subprocess.run(
            [str(BIN / "fed-certs"), "add-scientist", "--dir", str(certs), "--study", study, name],
            check=True, capture_output=True, timeout=_TIMEOUT_S,
        )  # fmt: skip
    secret = root / "console-password"
    secret.write_text(PASSWORD)
    started: list[Proc] = []
    try:
        server = Proc(
            [
                str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--serve",
                "--state-dir", str(root / "state"), "--scientists", str(certs / "scientists.json"),
                "--eval-data", str(shards / "test.npz"),
                "--console", "127.0.0.1:0", "--console-password-file", str(secret),
            ],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", _TIMEOUT_S).group(1))
        console = server.wait_for_line(r"console on (http://\S+)", _TIMEOUT_S).group(1)
        # One silo is enough to see a job proceed (every process started costs seconds).
        worker = [
            str(BIN / "fed-worker"), "--server", f"127.0.0.1:{port}",
            "--data", str(shards / "shard-0.npz"), "--name", "silo-0", "--threads", "1",
        ]  # fmt: skip
        started.append(Proc(worker, "silo-0"))
        # Alice's job runs (one at a time: --max-running-jobs 1); bob's waits behind it.
        job = ["submit", "--model", "logreg", "--rounds", "200", "--min-workers", "1",
               "--set", "batch_size=32", "--set", "learning_rate=0.05"]  # fmt: skip
        alice_job = json.loads(_fed_job(port, certs, "alice", *job, "--study", "cardio"))
        bob_job = json.loads(_fed_job(port, certs, "bob", *job, "--study", "onco"))
        yield Standing(console, port, certs, alice_job["job_id"], bob_job["job_id"])
        # A clean stop with the console up: the console stops before the job store it reads
        # closes (a page served in between was a 500), and nothing is left unhandled.
        server.signal(signal.SIGTERM)
        assert server.wait(_TIMEOUT_S) == 0, server.output
        assert "Traceback" not in server.output
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
        for p in started:
            p.kill()


def test_a_scientist_signs_in_with_their_token_follows_their_job_and_stops_it(
    page: Page, standing: Standing
) -> None:
    net = standing
    token_file = net.certs / "scientists" / "alice.token"
    with fedcore.connect(f"127.0.0.1:{net.port}", token_file=token_file) as alice:
        # The job proceeds: wait for its second round in its own log (what fed-job logs reads).
        for event in alice.jobs.logs(net.alice_job, follow=True, timeout=_TIMEOUT_S * 2):
            if event.metrics_json and json.loads(event.metrics_json)["round"] >= 2:
                break
        else:
            raise AssertionError("alice's job ended before its second round")
        page.goto(net.console)
        assert page.url.endswith("/login")
        page.fill("input[name=password]", token_file.read_text().strip())
        page.click("form.login button")
        assert "signed in as alice" in page.locator("header").inner_text()
        jobs = page.locator("#jobs").inner_text()
        assert net.alice_job in jobs  # positive control: her own job ...
        assert net.bob_job not in jobs  # ... and not bob's, nor the network's workers
        assert page.locator("#workers").count() == 0
        assert page.request.get(net.console + f"jobs/{net.bob_job}").status == 404
        page.click(f'tr[data-job="{net.alice_job}"] a')
        assert page.locator("svg.chart").count() == 4
        assert _points(page) >= 2  # accuracy after rounds 1 and 2 at least
        assert "round 2 completed" in page.locator("#job-log").inner_text()
        _shot(page, "console-network-scientist-job.png")
        page.click("form.stop button")
        assert "stop requested" in page.locator(".flash").inner_text()
        status = JobHandle(alice.jobs, net.alice_job).wait(timeout=_TIMEOUT_S)
        assert status.state == "stopped"  # at its next round boundary, as fed-job stop does
        page.reload()
        assert page.locator("form.stop").count() == 0
        assert "stop requested by alice" in page.locator("#job-log").inner_text()
