"""The standing network's parts without processes: the audit chain, the job store, job
settings, the scheduler, the approval wait and the release rule (issue 24)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fedcore.auditlog import AuditLog, verify
from fedcore.enrollment import Enrollment, EnrollmentEntry
from fedcore.errors import ConfigError, PolicyError, RoundFailedError
from fedcore.policy import load_policy
from fedcore.server.jobs.approval import ApprovalWatch
from fedcore.server.jobs.release import release_refusal, release_terms
from fedcore.server.jobs.scheduler import Scheduler
from fedcore.server.jobs.spec import check_query, job_config
from fedcore.server.jobs.store import JobRecord, JobStore
from fedcore.server.jobs.workers import JobWorkers
from fedcore.server.state.config import ServerConfig
from fedcore.server.state.registry import WorkerRegistry

# ---------------------------------------------------------------- audit log


def _log(tmp_path: Path, entries: int = 4) -> Path:
    log = AuditLog(tmp_path / "audit.log")
    for i in range(entries):
        log.append("submitted", job=f"j{i}", scientist="alice", epsilon=0.5 * i)
    return log.path


def test_an_untouched_chain_verifies_and_survives_reopening(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    AuditLog(path).append("completed", job="j0")  # a restart appends to the same chain
    assert verify(path) == (4, None)


@pytest.mark.parametrize("line", [1, 2, 4])
def test_an_edited_line_is_caught_at_that_line(tmp_path: Path, line: int) -> None:
    path = _log(tmp_path)
    assert verify(path)[1] is None  # positive control
    lines = path.read_text().splitlines()
    lines[line - 1] = lines[line - 1].replace('"scientist":"alice"', '"scientist":"bob"')
    path.write_text("\n".join(lines) + "\n")
    count, problem = verify(path)
    assert problem is not None
    assert problem.line == line
    assert count == line - 1


def test_a_removed_or_reordered_line_breaks_the_chain(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert verify(path)[1] is not None
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    problem = verify(path)[1]
    assert problem is not None
    assert problem.line == 1


# ---------------------------------------------------------------- job store


def _submit(store: JobStore, study: str = "s", **settings: object) -> JobRecord:
    return store.submit(study=study, scientist="alice", kind="train", settings=settings, rounds=2)


def test_the_store_survives_a_restart_and_requeues_running_jobs_in_their_place(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.db")
    first, second, third = (_submit(store) for _ in range(3))
    store.set_state(second.id, "running")
    store.record_round(second.id, 1, "round 1 completed", json.dumps({"round": 1}))
    store.close()  # as after a kill: everything was committed
    store = JobStore(tmp_path / "jobs.db")
    assert [r.id for r in store.recover()] == [second.id]
    assert [r.id for r in store.queued()] == [first.id, second.id, third.id]
    resumed = store.get(second.id)
    assert resumed.rounds_done == 1
    assert [e.text for e in store.events(second.id)][-1].startswith("the coordinator restarted")


def test_the_store_filters_jobs_by_study(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    a, b = _submit(store, "cardio"), _submit(store, "onco")
    assert [r.id for r in store.all(frozenset({"cardio"}))] == [a.id]
    assert [r.id for r in store.all()] == [a.id, b.id]
    with pytest.raises(KeyError):
        store.get("nope")


# ---------------------------------------------------------------- job settings


def test_job_settings_replace_the_job_fields_and_keep_the_process_ones() -> None:
    network = ServerConfig(listen="127.0.0.1:0", min_workers=1)
    config = job_config(
        network,
        {"model": "mnist-mlp", "rounds": 7, "learning_rate": 0.01, "require_tags": ["#Open"]},
        "job1",
    )
    assert (config.model.name, config.rounds, config.train.learning_rate) == ("mnist-mlp", 7, 0.01)
    assert config.require_tags == ("open",)
    assert config.listen == network.listen
    assert config.limits is network.limits
    secure = job_config(network, {"secagg": True, "min_workers": 3}, "job2")
    assert secure.secagg is not None
    assert secure.secagg.job == "job2"


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"listen": "0.0.0.0:1"}, "unknown training job setting"),
        ({"rounds": 0}, "--rounds must be at least 1"),
        ({"batch_size": 0}, "batch"),
        ({"model_params": "oops"}, "invalid job settings"),
        # Nothing a scientist names is imported on the coordinator.
        ({"model": "os:system"}, "registered models"),
        ({"strategy": "subprocess:Popen"}, "built-in"),
    ],
)
def test_bad_job_settings_are_refused(settings: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        job_config(ServerConfig(listen="127.0.0.1:0"), settings, "j")


def test_query_settings_are_checked() -> None:
    check_query({"query": "mean(age)", "epsilon": 1.0, "tags": ["x"]})
    with pytest.raises(ConfigError, match="epsilon"):
        check_query({"query": "mean(age)"})
    with pytest.raises(ConfigError, match="unknown query setting"):
        check_query({"query": "count()", "epsilon": 1, "rounds": 3})


# ---------------------------------------------------------------- release


@pytest.mark.parametrize(
    ("policies", "private", "allowed"),
    [
        ({"a": "allowed", "b": "allowed"}, False, True),
        ({"a": "allowed", "b": "dp-only"}, False, False),
        ({"a": "allowed", "b": "dp-only"}, True, True),
        ({"a": "never"}, True, False),
        ({"a": "sure, why not"}, True, False),  # an unknown word is the strictest
    ],
)
def test_a_model_is_released_only_when_every_silo_allows(
    policies: dict[str, str], private: bool, allowed: bool
) -> None:
    refusal = release_refusal(release_terms(policies, private=private))
    assert (refusal is None) is allowed


def test_the_release_policy_is_read_from_the_owners_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[release]\nmodel = "dp-only"\n')
    assert load_policy(policy).release_model == "dp-only"
    policy.write_text('[release]\nmodel = "sometimes"\n')
    with pytest.raises(PolicyError, match="allowed, dp-only, never"):
        load_policy(policy)


def test_scientists_studies_round_trip_through_the_enrollment_file(tmp_path: Path) -> None:
    enrollment = Enrollment.empty(tmp_path / "scientists.json", section="scientists")
    enrollment.set("alice", EnrollmentEntry("a" * 64, studies=("cardio", "onco")))
    enrollment.save()
    assert Enrollment(tmp_path / "scientists.json", section="scientists").get(
        "alice"
    ) == EnrollmentEntry("a" * 64, studies=("cardio", "onco"))


# ---------------------------------------------------------------- scheduler


class _FakeJob:
    def __init__(self, record: JobRecord, started: asyncio.Queue[str], gate: asyncio.Event) -> None:
        self.record = record
        self._started = started
        self._gate = gate

    async def run(self) -> None:
        self._started.put_nowait(self.record.id)
        await self._gate.wait()

    def stop(self) -> None:
        self._gate.set()


async def test_the_scheduler_runs_at_most_max_running_and_serves_studies_fairly(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "jobs.db")
    greedy = [_submit(store, "greedy") for _ in range(3)]
    other = _submit(store, "other")
    secure_a, secure_b = _submit(store, "x", secagg=True), _submit(store, "y", secagg=True)
    started: asyncio.Queue[str] = asyncio.Queue()
    gates = {r.id: asyncio.Event() for r in store.all()}
    scheduler = Scheduler(store, lambda r: _FakeJob(r, started, gates[r.id]), max_running=2)
    runner = asyncio.create_task(scheduler.run())

    async def next_started() -> str:
        return await asyncio.wait_for(started.get(), 5)

    # The other study's job overtakes the greedy study's second job.
    assert [await next_started(), await next_started()] == [greedy[0].id, other.id]
    scheduler.stop(greedy[2].id)  # queued: stopped at once, never started
    assert store.get(greedy[2].id).state == "stopped"
    gates[greedy[0].id].set()
    gates[other.id].set()
    assert {await next_started(), await next_started()} == {greedy[1].id, secure_a.id}
    # Securely aggregated jobs run together (their messages are routed by job id).
    gates[greedy[1].id].set()
    assert await next_started() == secure_b.id
    assert set(scheduler.running) == {secure_a.id, secure_b.id}
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


# ---------------------------------------------------------------- approval


def test_the_job_shows_whom_it_awaits_and_a_stopped_round_is_denied_or_failed() -> None:
    notes: list[tuple[str, str]] = []
    watch = ApprovalWatch(60, lambda t, s: notes.append((t, s)))
    watch.awaiting(["silo-2"], 1)
    watch.awaiting(["silo-2"], 1)  # one note per change, not one per poll
    assert notes == [
        (
            "awaiting approval at 1 of 1 silos (silo-2): their owners decide with "
            "`fed-worker requests approve|deny`",
            "awaiting-approval",
        )
    ]
    watch.awaiting([], 1)
    assert notes[-1] == ("approved: running", "running")
    watch.awaiting([], 1)  # nothing was awaited: no note
    assert len(notes) == 2
    awaiting = "refused: refused by the worker's policy [plans.approval]: awaiting approval: plan"
    other = RoundFailedError("r", answers={"silo-2": awaiting, "silo-1": "worker error: boom"})
    assert watch.verdict(other) == "failed"
    assert watch.denied == ""
    denial = (
        "refused: refused by the worker's policy [plans.approval]: plan abc was denied by the "
        "data owner: not for us (request 123)"
    )
    assert watch.verdict(RoundFailedError("r", answers={"silo-2": denial})) == "denied"
    assert watch.denied.startswith("denied at silo silo-2: plan abc was denied")
    # Still undecided when the engine's --approval-timeout passed: the job ends.
    late = ApprovalWatch(60, lambda t, s: None)
    assert late.verdict(RoundFailedError("r", answers={"silo-2": awaiting})) == "denied"
    assert "approval timeout (60 s)" in late.denied


# ---------------------------------------------------------------- per-job worker selection


async def test_a_job_selects_workers_by_its_tags_model_and_secure_aggregation() -> None:
    from fedcore.protocol import SECAGG_CAPABILITY
    from fedcore.v1 import fedcore_pb2 as pb

    registry = WorkerRegistry()

    async def join(name: str, tags: list[str], model: str = "", secagg: bool = True) -> None:
        hello = pb.Hello(
            name=name,
            num_examples=10,
            capabilities=["fit", *([SECAGG_CAPABILITY] if secagg else [])],
            dataset=pb.DatasetInfo(name=name, tags=tags, num_examples=10),
            release_model="dp-only" if name == "c" else "",
        )
        if model:
            hello.model.name = model
        await registry.activate(registry.new_session(hello, "peer", None))

    await join("a", ["mnist", "open"])
    await join("b", ["mnist"], model="mnist-cnn")
    await join("c", ["mnist"], secagg=False)

    def names(pool: JobWorkers) -> list[str]:
        return sorted(s.name for s in pool.idle())

    assert names(JobWorkers(registry)) == ["a", "b", "c"]  # positive control
    assert names(JobWorkers(registry, tags=("open",))) == ["a"]
    assert names(JobWorkers(registry, model="mnist-mlp")) == ["a", "c"]
    assert names(JobWorkers(registry, secagg=True)) == ["a", "b"]
    pool = JobWorkers(registry, tags=("mnist",))
    pool.excluded.add("b")
    assert names(pool) == ["a", "c"]
    assert pool.released == {"a": "allowed", "c": "dp-only"}
    assert await pool.wait_for_idle(2, 0.1)
    assert not await pool.wait_for_idle(3, 0.05)
    # A stopped job waits for nobody: the wait ends at once, not at its timeout.
    waiting = asyncio.create_task(pool.wait_for_idle(3, None))
    await asyncio.sleep(0)
    pool.stopped.set()
    assert not await asyncio.wait_for(waiting, 5)


# ---------------------------------------------------------------- fed-job's settings


def test_fed_job_reads_settings_from_flags_set_and_a_job_toml(tmp_path: Path) -> None:
    from fedcore.jobs.cli import _settings, build_parser

    job = tmp_path / "job.toml"
    job.write_text('study = "cardio"\nrounds = 5\nrequire_tags = ["mnist"]\n')
    args = build_parser().parse_args(
        ["--server", "x:1", "submit", "--config", str(job), "--min-workers", "3",
         "--set", "learning-rate=0.01", "--set", "strategy=fedprox"]
    )  # fmt: skip
    assert _settings(args) == (
        "cardio",
        "train",
        {
            "rounds": 5,
            "require_tags": ["mnist"],
            "min_workers": 3,
            "learning_rate": 0.01,
            "strategy": "fedprox",
        },
    )
    query = build_parser().parse_args(
        ["--server", "x:1", "submit", "--study", "onco", "--query", "count()", "--epsilon", "1"]
    )
    assert _settings(query) == ("onco", "query", {"query": "count()", "epsilon": 1.0, "tags": []})
    nostudy = build_parser().parse_args(["--server", "x:1", "submit", "--rounds", "2"])
    with pytest.raises(ConfigError, match="study"):
        _settings(nostudy)
