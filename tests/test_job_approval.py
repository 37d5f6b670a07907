"""``[jobs] approval = "always"`` in process: every job's tasks and every query wait in the
data owner's request queue, naming the job, the scientist and the study; the owner's
``fed-worker requests approve|deny`` decides; a query job shows whom it awaits and ends
denied on a denial or the approval timeout (issue 24)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hostile import evaluate_task, fit_task
from test_analytics_rounds import HONEST_SILOS, SCHEMA, _Silo, _silo
from test_coordinator import config
from test_gate import LOGREG, _gate, _with_weights

from fedcore.analytics.layout import plan_layout
from fedcore.analytics.mechanism import noise_multiplier_for
from fedcore.analytics.query import parse_query
from fedcore.auditlog import AuditLog
from fedcore.errors import AwaitingApproval, PolicyError, QueryRefusedError, TaskRefused
from fedcore.plans.queue import RequestQueue
from fedcore.policy import load_policy
from fedcore.server.analytics.rounds import QueryAwaitingApproval, QueryOrigin, QueryRound
from fedcore.server.jobs.job import JobEnvironment
from fedcore.server.jobs.query import QueryJob
from fedcore.server.jobs.store import JobStore
from fedcore.server.state.registry import WorkerRegistry
from fedcore.server.transport.traffic import TrafficCounters
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.console_view import OwnerView
from fedcore.worker.requests_cli import requests_main

ALWAYS = '[jobs]\napproval = "always"\n'


def _job_task(job: str = "job-1", learning_rate: float = 0.05) -> pb.Task:
    task = _with_weights(fit_task(learning_rate=learning_rate), LOGREG)
    task.job_id, task.scientist, task.study = job, "alice", "cardio"
    return task


def test_the_policy_reads_jobs_approval_and_refuses_unknown_values(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ALWAYS)
    policy = load_policy(path)
    assert policy.job_approval == "always"
    assert any("every job and query" in line for line in policy.describe())
    path.write_text('[jobs]\napproval = "sometimes"\n')
    with pytest.raises(PolicyError, match=r"\[jobs\].*approval.*plans, always"):
        load_policy(path)


def test_every_job_waits_for_the_owner_who_sees_job_scientist_study_and_terms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Positive control: the same task on a silo that approves only plans runs at once.
    assert _gate().admit(_job_task()).kind == "fit"
    gate = _gate(ALWAYS, tmp_path)
    with pytest.raises(AwaitingApproval, match=r"\[jobs.approval\]: awaiting approval: job"):
        gate.admit(_job_task())
    queue = RequestQueue(tmp_path / "plan-requests")
    (request,) = queue.list()
    assert request.status == "pending"
    assert request.job is not None
    assert (request.job.job, request.job.scientist, request.job.study) == (
        "job-1",
        "alice",
        "cardio",
    )
    assert request.job.model == "logreg"
    assert request.terms.train is not None
    assert request.terms.train.learning_rate == 0.05
    # Asked again (the engine's retry): the same request, still pending.
    with pytest.raises(AwaitingApproval):
        gate.admit(_job_task())
    assert len(queue.list()) == 1
    # The owner reviews it with fed-worker requests, then approves it for one round.
    where = ["--queue", str(queue.root)]
    assert requests_main(["list", *where]) == 0
    assert "job job-1 by 'alice' (study 'cardio')" in capsys.readouterr().out
    assert requests_main(["show", request.id[:16], *where]) == 0
    shown = capsys.readouterr().out
    assert "'alice' in study 'cardio'" in shown
    assert "learning rate 0.05" in shown
    assert requests_main(["approve", request.id[:16], "--rounds", "1", *where]) == 0
    assert gate.admit(_job_task()).kind == "fit"
    assert gate.admit(evaluate_task_of("job-1")).kind == "evaluate"  # follows the training
    with pytest.raises(TaskRefused, match=r"covered 1 round\(s\) of this job, all run"):
        gate.admit(_job_task())
    # Other terms, or another job, are new requests: they wait for their own decision.
    with pytest.raises(AwaitingApproval):
        gate.admit(_job_task(learning_rate=0.5))
    with pytest.raises(AwaitingApproval):
        gate.admit(_job_task("job-2"))
    # The owner's web console reviews a job's request too (no program to verify).
    review = OwnerView(queue=queue, policy=gate.policy, worker=None, dataset=None).review(  # type: ignore[arg-type]
        request.id
    )
    assert review is not None
    assert review.problem == ""
    assert ("scientist", "alice (as the coordinator says)") in review.details
    job2 = next(r for r in queue.list() if r.job is not None and r.job.job == "job-2")
    queue.decide(job2.id, approve=False, reason="not for our patients")
    with pytest.raises(TaskRefused, match=r"denied by the data owner: not for our patients"):
        gate.admit(_job_task("job-2"))


def evaluate_task_of(job: str) -> pb.Task:
    task = _with_weights(evaluate_task(), LOGREG)
    task.job_id, task.scientist, task.study = job, "alice", "cardio"
    return task


ORIGIN = QueryOrigin("job-q", "bob", "onco")


async def _origin_ask(silos: list[_Silo], query_id: str, origin: QueryOrigin) -> np.ndarray:
    """A count over ``silos`` asked for job ``origin`` (the round the network's job runs)."""
    layout = plan_layout(parse_query("count()"), SCHEMA)
    round_ = QueryRound(
        query_id,
        layout,
        epsilon=0.5,
        delta=1e-6,
        noise_multiplier=noise_multiplier_for(0.5, 1e-6),
        sessions=silos,  # type: ignore[arg-type]
        phase_timeout=20.0,
        origin=origin,
    )
    for s in silos:
        s.round = round_
    return (await round_.run(layout.query.text())).totals


async def test_a_query_waits_for_the_owner_is_answered_once_approved_and_once_only(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(5)
    always = 'honest-silos = 3\n[jobs]\napproval = "always"\n'
    responders = [
        _silo(tmp_path, i, rng.uniform(20, 90, 30), 5.0, always if i == 2 else HONEST_SILOS)
        for i in range(3)
    ]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    try:
        with pytest.raises(QueryAwaitingApproval) as waiting:
            await _origin_ask(silos, "q1", ORIGIN)
        assert (waiting.value.silos, waiting.value.asked) == (["silo-2"], 3)
        # Nothing was answered, so nothing was charged anywhere.
        for r in responders:
            assert r._gate.guard.ledger.charges() == []  # type: ignore[union-attr]
        queue = RequestQueue(tmp_path / "plan-requests")
        (request,) = queue.list()
        assert request.job is not None
        assert (request.job.job, request.job.scientist, request.job.query) == (
            "job-q",
            "bob",
            "count()",
        )
        queue.decide(request.id, approve=True)
        totals = await _origin_ask(silos, "q2", ORIGIN)
        assert totals.shape == (1,)
        assert len(responders[2]._gate.guard.ledger.charges()) == 1  # type: ignore[union-attr]
        # The approval covered one answer: the coordinator cannot have it answered again.
        with pytest.raises(QueryRefusedError, match=r"\[jobs.approval\].*all given") as again:
            await _origin_ask(silos, "q3", ORIGIN)
        assert not isinstance(again.value, QueryAwaitingApproval)
        assert len(responders[2]._gate.guard.ledger.charges()) == 1  # type: ignore[union-attr]
    finally:
        for s in silos:
            s.pump.cancel()


class _Frontend:
    """Owners who decide after ``waits`` asks (``denial``: deny then; None: never decide)."""

    def __init__(self, waits: int, denial: str | None) -> None:
        self.waits = waits
        self.denial = denial
        self.asked: list[QueryOrigin | None] = []

    async def query(self, text: str, **kw: object) -> object:
        self.asked.append(kw.get("origin"))  # type: ignore[arg-type]
        if len(self.asked) <= self.waits or self.denial is None:
            raise QueryAwaitingApproval("waits", silos=["clinic-1"], asked=2)
        raise QueryRefusedError(
            f"the query was not answered: silo 'clinic-1': [jobs.approval] job x was denied "
            f"by the data owner: {self.denial}"
        )


def _query_job(tmp_path: Path, frontend: _Frontend, timeout: float) -> tuple[QueryJob, JobStore]:
    cfg = config()
    cfg = replace(cfg, limits=replace(cfg.limits, approval_timeout=timeout))
    store = JobStore(tmp_path / "jobs.db")
    record = store.submit(
        study="onco",
        scientist="bob",
        kind="query",
        settings={"query": "count()", "epsilon": 0.5},
        rounds=0,
    )
    service = SimpleNamespace(counters=TrafficCounters())  # the job counts its bytes there
    env = JobEnvironment(
        cfg,
        service,  # type: ignore[arg-type]
        WorkerRegistry(),
        store,
        AuditLog(tmp_path / "audit.log"),
        tmp_path,
    )
    return QueryJob(record, env, frontend), store  # type: ignore[arg-type]


async def test_a_query_job_shows_whom_it_awaits_and_ends_denied_with_the_reason(
    tmp_path: Path,
) -> None:
    frontend = _Frontend(waits=2, denial="not for this study")
    job, store = _query_job(tmp_path, frontend, timeout=60)
    await asyncio.wait_for(job.run(), 30)
    record = store.get(job.record.id)
    assert record.state == "denied"
    assert "not for this study" in record.message
    lines = [e.text for e in store.events(record.id, 0)]
    assert lines[1].startswith("awaiting approval at 1 of 2 silos (clinic-1)")
    # The silos were told the job, the scientist and the study each time.
    assert frontend.asked == [QueryOrigin(record.id, "bob", "onco")] * 3
    store.close()


async def test_a_query_job_undecided_past_the_approval_timeout_ends_denied(
    tmp_path: Path,
) -> None:
    job, store = _query_job(tmp_path, _Frontend(waits=0, denial=None), timeout=0.2)
    await asyncio.wait_for(job.run(), 30)
    record = store.get(job.record.id)
    assert record.state == "denied"
    assert "no decision within the approval timeout (0.2 s) at silo(s) clinic-1" in record.message
    # No answer; only the job's bytes (none: the fake frontend sent nothing).
    assert json.loads(record.result or "{}") == {"bytes": {"sent": 0, "received": 0}}
    store.close()
