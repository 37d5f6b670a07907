"""A query's whole protocol in memory: the coordinator's QueryRound against three workers'
QueryResponders behind their real gates, with the noise on, and a hostile coordinator or
data scientist (issue 22: free refusals, the delta bypass, inflated silo counts)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.analytics.encoding import round_setup
from fedcore.analytics.layout import plan_layout
from fedcore.analytics.local import local_sums
from fedcore.analytics.mechanism import noise_multiplier_for, noise_std
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import DatasetMetadata, FeatureInfo
from fedcore.data.table import Table
from fedcore.errors import QueryRefusedError, TaskRefused
from fedcore.model_catalog import ModelCatalog
from fedcore.policy import load_policy
from fedcore.secagg import wire
from fedcore.secagg.identity import SiloIdentity
from fedcore.secagg.simulation import make_identities
from fedcore.server.analytics.frontend import answer_of
from fedcore.server.analytics.rounds import QueryRound
from fedcore.server.state.registry import SessionState
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker.analytics import QueryResponder
from fedcore.worker.gate import Gate
from fedcore.worker.policy import PolicyGuard

FEATURES = (FeatureInfo("age", "float64", minimum=0.0, maximum=100.0),)
SCHEMA = {f.name: f for f in FEATURES}


class _Silo:
    """A worker's stream in memory: messages are handled in order by its responder."""

    def __init__(self, name: str, responder: QueryResponder) -> None:
        self.name = name
        self.worker_id = name
        self.state = SessionState.IDLE
        self.responder = responder
        self.round: QueryRound | None = None
        self.inbox: asyncio.Queue[pb.CoordinatorMessage] = asyncio.Queue()
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    def send_urgent(self, message: pb.CoordinatorMessage) -> None:
        self.inbox.put_nowait(message)

    async def _reply(self, message: pb.WorkerMessage) -> None:
        assert self.round is not None
        self.round.on_message(self, message.analytics)  # type: ignore[arg-type]

    async def _pump(self) -> None:
        while True:
            message = await self.inbox.get()
            await self.responder.handle(message.analytics, self._reply)


#: A silo's [analytics] table by default: sums over at least three silos.
HONEST_SILOS = "honest-silos = 3\n"


def _silo(
    tmp_path: Path,
    i: int,
    ages: np.ndarray,
    budget: float,
    analytics: str = HONEST_SILOS,
    identity: SiloIdentity | None = None,
) -> QueryResponder:
    tmp_path.mkdir(parents=True, exist_ok=True)
    policy_path = tmp_path / f"policy{i}.toml"
    policy_path.write_text(
        f'[budget]\nstudy = "s"\nepsilon = {budget}\ndelta = 1e-5\nledger = "ledger{i}.json"\n'
        f"[analytics]\nmax-epsilon = 2.0\n{analytics}"
    )
    policy = load_policy(policy_path)
    guard = PolicyGuard(policy, num_examples=len(ages))
    gate = Gate(ModelCatalog(None), max_model_bytes=1 << 20, guard=guard)
    table = Table({"age": ages}, len(ages))
    responder = QueryResponder(
        table, DatasetMetadata(f"silo {i}", features=FEATURES), identity=identity
    )
    responder.attach(gate)
    return responder


async def _ask(
    silos: list[_Silo], text: str, epsilon: float, query_id: str, *, signed: bool = False
) -> tuple[np.ndarray, QueryRound]:
    layout = plan_layout(parse_query(text), SCHEMA)
    round_ = QueryRound(
        query_id,
        layout,
        epsilon=epsilon,
        delta=1e-6,
        noise_multiplier=noise_multiplier_for(epsilon, 1e-6),
        sessions=silos,  # type: ignore[arg-type]
        phase_timeout=20.0,
        signed=signed,
    )
    for s in silos:
        s.round = round_
    outcome = await round_.run(layout.query.text())
    return outcome.totals, round_


async def test_noisy_answers_through_the_whole_protocol_err_at_the_calibrated_scale(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    parts = [rng.uniform(20, 90, 50) for _ in range(3)]
    responders = [_silo(tmp_path, i, ages, budget=1e9) for i, ages in enumerate(parts)]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    truth = sum(len(p) for p in parts)
    layout = plan_layout(parse_query("count()"), SCHEMA)
    std = float(noise_std(layout, noise_multiplier_for(1.0, 1e-6))[0])
    errors = []
    for k in range(30):
        totals, _ = await _ask(silos, "count()", 1.0, f"q{k}")
        errors.append((totals[0] - truth) / std)
    # 30 standardized errors of N(0, 1): their std is within [0.6, 1.4] with probability
    # far above 0.999, and their mean within 4/sqrt(30).
    assert 0.6 < float(np.std(errors)) < 1.4
    assert abs(float(np.mean(errors))) < 4 / math.sqrt(30)
    assert all(r.answered == 30 for r in responders)
    charges = responders[0]._gate.guard.ledger.charges()  # type: ignore[union-attr]
    assert len(charges) == 30
    for s in silos:
        s.pump.cancel()


async def test_a_silo_over_budget_refuses_and_nothing_is_revealed(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    budgets = [5.0, 5.0, 0.6]
    responders = [_silo(tmp_path, i, rng.uniform(20, 90, 40), b) for i, b in enumerate(budgets)]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    await _ask(silos, "mean(age)", 0.5, "first")  # positive control: within every budget
    with pytest.raises(QueryRefusedError, match=r"silo 'silo-2': \[budget\]"):
        await _ask(silos, "mean(age)", 0.5, "second")
    # Only the accepted query was charged, on every silo.
    for r in responders:
        assert len(r._gate.guard.ledger.charges()) == 1  # type: ignore[union-attr]
    for s in silos:
        s.pump.cancel()


def _task(responder: QueryResponder, **changes: object) -> pb.QueryTask:
    silos = int(changes.pop("silos", 3))  # type: ignore[call-overload]
    threshold = int(changes.pop("threshold", silos))  # type: ignore[call-overload]
    setup = round_setup("q", silos, 10.0)
    proto = wire.setup_to_proto(setup)
    proto.threshold = threshold
    task = pb.QueryTask(
        query_id="q", query="mean(age)", epsilon=0.5, delta=1e-6, silos=silos, secagg=proto
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


def test_the_gate_refuses_a_hostile_coordinators_queries(tmp_path: Path) -> None:
    responder = _silo(tmp_path, 0, np.linspace(20, 80, 30), budget=5.0)
    gate = responder._gate
    assert gate is not None
    assert gate.admit_query(_task(responder)).charge.noise_multiplier > 1  # positive control
    attacks: list[tuple[dict[str, object], str]] = [
        ({"threshold": 2}, "secure-aggregation.setup"),  # unmask a sum without every silo
        ({"silos": 2, "threshold": 2}, "secure-aggregation.setup"),  # a group below 3
        ({"query": "rows()"}, "analytics.query"),
        ({"query": "mean(age) where __import__ > 0"}, "analytics.query"),
        ({"epsilon": math.inf}, "analytics.max-epsilon"),
        ({"epsilon": -1.0}, "analytics.max-epsilon"),
        ({"delta": 0.0}, "analytics.max-delta"),
        ({"delta": 0.1}, "analytics.max-delta"),  # epsilon bought at a large delta
    ]
    for changes, rule in attacks:
        with pytest.raises(TaskRefused) as refused:
            gate.admit_query(_task(responder, **changes))
        assert refused.value.rule == rule, changes
    task = _task(responder)
    task.secagg.quant_bits = 16  # a coarser format than the standard one
    with pytest.raises(TaskRefused, match="fixed-point"):
        gate.admit_query(task)


# ---------------------------------------------------------------------- issue 22's attacks


async def _verdict(responder: QueryResponder, task: pb.QueryTask) -> str:
    """What a silo's stream answers ``task`` (a refusal's rule and text, or the accept's
    public numbers), then forget the query: the view of the coordinator and the scientist."""
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    await responder.handle(pb.AnalyticsCoordinatorMessage(task=task), send)
    responder.reset()
    first = sent[0].analytics
    if first.WhichOneof("body") == "refusal":
        return f"refused [{first.refusal.rule}] {first.refusal.reason}"
    accept = first.accept
    return f"accepted z={accept.noise_multiplier} eps={accept.epsilon} words={accept.vector_words}"


def _range_task(responder: QueryResponder, low: float, high: float, epsilon: float) -> pb.QueryTask:
    return _task(
        responder, query=f"count() where age >= {low:g} and age <= {high:g}", epsilon=epsilon
    )


async def _binary_search_smallest(responder: QueryResponder) -> tuple[float, list[str]]:
    """The attack of issue 22: find the smallest value by asking whether [0, t] holds too
    few records to be answered; returns the estimate and the transcript."""
    low, high = 0.0, 100.0
    transcript = []
    for _ in range(20):
        middle = (low + high) / 2
        verdict = await _verdict(responder, _range_task(responder, 0.0, middle, 0.5))
        transcript.append(verdict)
        if verdict.startswith("refused"):  # too few records at or below the middle
            low = middle
        else:
            high = middle
    return high, transcript


async def test_the_binary_search_on_refusals_recovers_nothing_and_is_never_free(
    tmp_path: Path,
) -> None:
    """Two silos whose smallest ages differ (31.25 and 62.5): the search's transcripts are the
    same, so it learns nothing; and admissions charge nothing because nothing was released."""
    ages = np.linspace(40, 90, 25)
    a = _silo(tmp_path / "a", 0, np.concatenate([ages, [31.25]]), budget=5.0)
    b = _silo(tmp_path / "b", 0, np.concatenate([ages, [62.5]]), budget=5.0)
    found_a, transcript_a = await _binary_search_smallest(a)
    found_b, transcript_b = await _binary_search_smallest(b)
    assert transcript_a[0].startswith("accepted")  # positive control: the harness reaches it
    assert transcript_a == transcript_b
    assert found_a == found_b
    for r in (a, b):
        assert r._gate.guard.ledger.charges() == []  # type: ignore[union-attr]


async def test_after_the_budget_every_refusal_is_the_same_whatever_the_data(
    tmp_path: Path,
) -> None:
    """Issue 22: six thresholds after the budget was spent gave four different refusals.
    Now every silo past its budget gives one text, for every query and every table."""
    verdicts = set()
    for name, ages in (("a", np.linspace(20, 90, 30)), ("b", np.full(30, 55.0))):
        responder = _silo(tmp_path / name, 0, ages, budget=0.6)
        gate = responder._gate
        assert gate is not None
        first = await _verdict(responder, _range_task(responder, 0, 100, 0.5))
        assert first.startswith("accepted")  # positive control: within the budget
        spent = _range_task(responder, 0, 100, 0.5)
        gate.release_query(gate.admit_query(spent).charge, spent)
        for threshold in (10, 30, 50, 54, 56, 70):
            for epsilon in (0.5, 2.0):
                task = _range_task(responder, threshold, threshold + 2, epsilon)
                verdicts.add(await _verdict(responder, task))
    assert len(verdicts) == 1, verdicts
    assert verdicts.pop().startswith("refused [budget]")
    assert responder.refusals == {"budget": 12}  # counted, by rule


async def test_a_large_delta_does_not_buy_epsilon_past_the_cap(tmp_path: Path) -> None:
    """Issue 22 item 5: epsilon 2 at delta 0.1 under a cap of 2 costs far more at the ledger's
    delta. With the default max-delta (the budget's) the delta is refused; where the owner
    allowed large deltas the cap is checked at the ledger's delta."""
    ages = np.linspace(20, 90, 30)
    default = _silo(tmp_path / "default", 0, ages, budget=50.0)
    loose = _silo(tmp_path / "loose", 0, ages, budget=50.0, analytics="max-delta = 0.5\n")
    for responder in (default, loose):  # positive control: the same epsilon at a small delta
        assert (await _verdict(responder, _task(responder, epsilon=2.0))).startswith("accepted")
    bypass = {"epsilon": 2.0, "delta": 0.1}
    assert "[analytics.max-delta]" in await _verdict(default, _task(default, **bypass))
    refused = await _verdict(loose, _task(loose, **bypass))
    assert "[analytics.max-epsilon]" in refused
    assert "budget delta 1e-05" in refused


async def test_the_noise_share_follows_the_silos_policy_not_the_silo_count(
    tmp_path: Path,
) -> None:
    """Issue 22 item 6, through the whole protocol: with the default policy each of the three
    silos adds the whole noise (it trusts nobody), so the total's std is sqrt(3) times the
    calibrated one, not 1 as when each added a third of the variance."""
    rng = np.random.default_rng(5)
    parts = [rng.uniform(20, 90, 40) for _ in range(3)]
    responders = [_silo(tmp_path, i, p, budget=1e9, analytics="") for i, p in enumerate(parts)]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    text = "histogram(age, bins=50)"  # 50 independent noisy words per answer
    layout = plan_layout(parse_query(text), SCHEMA)
    std = noise_std(layout, noise_multiplier_for(1.0, 1e-6))
    truth = sum(local_sums(layout, Table({"age": p}, len(p))).values for p in parts)
    errors = []
    for k in range(6):
        totals, _ = await _ask(silos, text, 1.0, f"q{k}")
        errors.extend(((totals - truth) / std).tolist())
    # 300 draws of N(0, 3): their std is sqrt(3) = 1.73 within 4% (one standard error).
    assert 1.5 < float(np.std(errors)) < 2.0
    for s in silos:
        s.pump.cancel()


@pytest.mark.parametrize(("analytics", "honest"), [("", 1), ("honest-silos = 3\n", 3)])
async def test_the_answers_error_bars_are_the_noise_the_silos_added(
    tmp_path: Path, analytics: str, honest: int
) -> None:
    """The coordinator's reported std against the empirical std of answers, for h = 1 (each
    silo adds the whole noise) and h = n = 3 (each a third of the variance). Before, the
    answer assumed h = n whatever the silos did: sqrt(3) too small at h = 1."""
    rng = np.random.default_rng(11)
    parts = [rng.uniform(20, 90, 40) for _ in range(3)]
    responders = [
        _silo(tmp_path, i, p, budget=1e9, analytics=analytics) for i, p in enumerate(parts)
    ]
    silos = [_Silo(f"silo-{i}", r) for i, r in enumerate(responders)]
    text = "histogram(age, bins=50)"  # 50 independent noisy words per answer
    layout = plan_layout(parse_query(text), SCHEMA)
    z = noise_multiplier_for(1.0, 1e-6)
    truth = sum(local_sums(layout, Table({"age": p}, len(p))).values for p in parts)
    errors: list[float] = []
    reported = set()
    for k in range(6):
        totals, round_ = await _ask(silos, text, 1.0, f"q{k}")
        accepts = {silos[i - 1].name: a for i, a in round_.accepts.items()}
        assert all(a.noise_variance > 0 for a in accepts.values())
        answer = answer_of(layout, totals, accepts, z, 1e-6)
        reported.add(round(answer.noise_std["bin"], 9))
        errors.extend((totals - truth).tolist())
    (std,) = reported
    # 300 draws: the empirical std is within 15% of the truth with probability > 0.99.
    assert 0.85 < float(np.std(errors)) / std < 1.15
    assumed = float(noise_std(layout, z)[0])  # what the answer said before
    assert std / assumed == pytest.approx(math.sqrt(3 / honest), rel=0.02)
    for s in silos:
        s.pump.cancel()


async def test_an_inflated_silo_count_does_not_thin_the_noise(tmp_path: Path) -> None:
    """A coordinator claiming 50 silos (threshold 50, so the setup is consistent) gets the
    share of the 3 honest silos the policy assumes, or a refusal where max-silos is lower."""
    ages = np.linspace(20, 90, 30)
    trusting = _silo(tmp_path / "t", 0, ages, budget=5.0)  # honest-silos = 3
    task = _task(trusting, silos=50)
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    await trusting.handle(pb.AnalyticsCoordinatorMessage(task=task), send)
    assert sent[0].analytics.WhichOneof("body") == "accept"
    assert trusting._open["q"].divisor == 3  # not 50
    trusting.reset()
    capped = _silo(tmp_path / "c", 0, ages, budget=5.0, analytics="max-silos = 10\n")
    assert (await _verdict(capped, _task(capped, silos=10))).startswith("accepted")
    assert "[analytics.max-silos]" in await _verdict(capped, _task(capped, silos=50))


def test_a_query_is_compiled_once_and_answered_from_that_compilation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27 (Tumult's split): the gate's check and the answer share one parse and plan;
    the local sums are measured once, after admission."""
    import fedcore.worker.analytics as worker_analytics

    responder = _silo(tmp_path, 0, np.linspace(20, 80, 30), budget=5.0)
    gate = responder._gate
    assert gate is not None
    calls = {"plan_layout": 0, "local_sums": 0}

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(worker_analytics, name, counted(name, getattr(worker_analytics, name)))
    opened = responder._admit(_task(responder), gate)
    assert calls == {"plan_layout": 1, "local_sums": 1}
    assert opened.layout.query.text() == "mean(age)"
    assert opened.scaled.shape == (2,)  # the count and the centred sum, measured


async def test_a_silo_tells_the_scientist_its_budget_left(tmp_path: Path) -> None:
    """Issue 27, trap 4: the budget left (data-independent: it follows the releases asked)
    travels in the silo's acceptance, to the answer."""
    from fedcore.policy import PrivacyLedger, epsilon_of

    responder = _silo(tmp_path, 0, np.linspace(20, 80, 30), budget=5.0)
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> None:
        sent.append(message)

    await responder.handle(pb.AnalyticsCoordinatorMessage(task=_task(responder)), send)
    accept = sent[0].analytics.accept
    assert accept.query_id == "q"  # positive control: admitted
    charge = responder._open["q"].charge
    ledger = PrivacyLedger(tmp_path / "ledger0.json", study="s")
    expected = 5.0 - epsilon_of([*ledger.charges(), charge], delta=1e-5)
    assert accept.budget_left == pytest.approx(expected)
    assert accept.budget_delta == 1e-5
    assert 0 < accept.budget_left < 5.0


async def test_a_signed_query_round_runs_the_same_driver_and_sums_exactly(tmp_path: Path) -> None:
    """The coordinator's signed query round against three signing silos: keys signed and
    checked, the request signed by all, the exact sum (test mode) as unsigned."""
    names = [f"silo-{i}" for i in range(3)]
    identities = make_identities(names)
    parts = [np.full(n, 50.0) for n in (10, 20, 30)]
    responders = [
        _silo(tmp_path / name, i, ages, budget=100.0, identity=identities[name])
        for i, (name, ages) in enumerate(zip(names, parts, strict=True))
    ]
    for r in responders:
        r.exact = True  # the sum itself is checked, not the noise
    silos = [_Silo(name, r) for name, r in zip(names, responders, strict=True)]
    totals, round_ = await _ask(silos, "count()", 1.0, "signed-q", signed=True)
    assert round_.setup.signed
    assert round_.setup.members == tuple(names)
    assert totals[0] == pytest.approx(60.0, abs=1e-3)
    assert all(r.answered == 1 for r in responders)
    # A signing silo refuses the same query unsigned, before any key leaves.
    with pytest.raises(QueryRefusedError, match=r"\[secure-aggregation.signed\]"):
        await _ask(silos, "count()", 1.0, "unsigned-q")
    for s in silos:
        s.pump.cancel()


def test_a_query_claiming_more_silos_than_the_policy_allows_is_refused(tmp_path: Path) -> None:
    """[secure-aggregation] max-silos bounds a query's round as it bounds a training round."""
    bounded = "honest-silos = 3\n[secure-aggregation]\nmax-silos = 4\n"
    responder = _silo(tmp_path, 0, np.linspace(20, 80, 30), budget=5.0, analytics=bounded)
    gate = responder._gate
    assert gate is not None
    assert gate.admit_query(_task(responder, silos=4)).charge.noise_multiplier > 1  # the control
    with pytest.raises(TaskRefused) as refused:
        gate.admit_query(_task(responder, silos=5))
    assert refused.value.rule == "secure-aggregation.max-silos"
    assert "at most 4" in refused.value.reason
