"""What the data owner's console shows, read from the worker's own sources of truth.

The request queue (:class:`~fedcore.plans.queue.RequestQueue`, the one ``fed-worker
requests`` and the worker's gate use), the privacy ledger
(:class:`~fedcore.policy.ledger.PrivacyLedger`), the worker's hash-chained audit log
(``--audit-log``, :mod:`.console_audit`), the running :class:`~.runtime.Worker` and the
dataset's metadata. Nothing here writes, except :meth:`OwnerView.decide`, which calls the
queue's own ``decide`` exactly as the command line does. Every method may block on files:
the console calls them in a thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fedcore.data.metadata import DatasetMetadata
from fedcore.errors import ConfigError, LedgerError, PlanError, PlanRejectedError
from fedcore.plans.queue import JobOrigin, PlanRequestRecord, RequestQueue
from fedcore.policy import Policy
from fedcore.policy.check import DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY
from fedcore.policy.ledger import Charge, PrivacyLedger, epsilon_of

from .console_audit import AuditEvent, ChainStatus, read_chain

if TYPE_CHECKING:
    from fedcore.plans.load import VerifiedPlan

    from .runtime import RunningTask, WorkerState

__all__ = [
    "AuditEvent",
    "ChainStatus",
    "LedgerPoint",
    "OwnerView",
    "PlanReview",
    "StudyLedger",
    "WorkerNow",
    "WorkerStatus",
]

_KEEP_VERIFIED = 16
#: Charges plotted at most per study (the newest; the epsilon of each is exact).
MAX_PLOTTED_CHARGES = 400
#: Audit events listed at most (the newest that match the search).
MAX_AUDIT_EVENTS = 1000


class WorkerStatus(Protocol):
    """What the console reads of the running :class:`~.runtime.Worker`."""

    @property
    def name(self) -> str: ...
    @property
    def server(self) -> str: ...
    @property
    def state(self) -> WorkerState: ...
    @property
    def worker_id(self) -> str | None: ...
    @property
    def tasks_done(self) -> int: ...
    @property
    def tasks_refused(self) -> int: ...
    @property
    def current(self) -> RunningTask | None: ...


@dataclass(frozen=True)
class PlanReview:
    """A request as the owner reviews it: plain-language terms and the verifier's account."""

    record: PlanRequestRecord
    #: (what, in words) pairs: the model, what leaves the silo, DP, secure aggregation...
    summary: tuple[tuple[str, str], ...]
    #: the verifier's description, line by line (``fed-worker requests show``)
    details: tuple[tuple[str, str], ...]
    #: why the queued program could not be verified here, if it could not
    problem: str = ""


@dataclass(frozen=True)
class LedgerPoint:
    index: int
    epsilon: float
    what: str


@dataclass(frozen=True)
class StudyLedger:
    study: str
    delta: float
    budget: float | None  # the policy's, for its own study
    points: tuple[LedgerPoint, ...]
    charges: int

    @property
    def spent(self) -> float:
        return self.points[-1].epsilon if self.points else 0.0


@dataclass(frozen=True)
class WorkerNow:
    name: str
    server: str
    state: str
    worker_id: str | None
    tasks_done: int
    tasks_refused: int
    task: str  # "round 4: fit, for 12 s", or "" between tasks


_DESCRIBED = re.compile(r"\s*(\S.*?)\s{2,}(.*)")


def _job_lines(job: JobOrigin) -> tuple[tuple[str, str], ...]:
    """A job's request (``[jobs] approval = "always"``) as the coordinator described it."""
    rows = [
        ("job", job.job or "(a one-shot federation)"),
        ("scientist", f"{job.scientist} (as the coordinator says)"),
        ("study", job.study),
    ]
    if job.query:
        rows.append(("query", f"{job.query} at epsilon {job.epsilon:g}, delta {job.delta:g}"))
    else:
        rows.append(("model", job.model + (f" (plan {job.plan[:16]})" if job.plan else "")))
    return tuple(rows)


def _lines(lines: list[str]) -> tuple[tuple[str, str], ...]:
    """``describe_plan``'s ``"  key        value"`` lines as (key, value) pairs."""
    out: list[tuple[str, str]] = []
    for line in lines:
        m = _DESCRIBED.fullmatch(line)
        key, value = m.groups() if m else line.strip().partition(" ")[::2]
        out.append((key, value.strip()))
    return tuple(out)


class OwnerView:
    """Read-only access to what the owner's console shows (and the one decision it makes).

    Args:
        queue: the plan request queue (None: the policy approves no plans by hand).
        policy: the worker's policy (its budget names the study and the ledger).
        worker: the running worker (state and current task).
        dataset: the local data's public description.
        audit_log: the worker's hash-chained audit log (``--audit-log``; None: not kept).
    """

    def __init__(
        self,
        *,
        queue: RequestQueue | None,
        policy: Policy,
        worker: WorkerStatus,
        dataset: DatasetMetadata | None,
        audit_log: Path | None = None,
    ) -> None:
        self.queue = queue
        self.audit_log = audit_log
        self.policy = policy
        self.worker = worker
        self.dataset = dataset
        self._verified: OrderedDict[str, VerifiedPlan] = OrderedDict()
        # study -> (charges counted, their points): the ledger only grows, so a page computes
        # the epsilon of the new charges only.
        self._curves: dict[str, tuple[int, tuple[LedgerPoint, ...]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests

    def requests(self) -> list[PlanRequestRecord]:
        """Every request, newest first (pending ones first of all)."""
        if self.queue is None:
            return []
        records = self.queue.list()
        records.reverse()
        return sorted(records, key=lambda r: r.status != "pending")

    def review(self, rid: str) -> PlanReview | None:
        """Request ``rid`` in words, with the queued program verified again here."""
        if self.queue is None:
            return None
        try:
            record = self.queue.get(rid)
        except ConfigError:
            return None
        if record is None:
            return None
        if record.job is not None:  # a job's request ([jobs] approval): no program to verify
            return PlanReview(record, self._terms(record, None), _job_lines(record.job))
        try:
            plan = self._verify(record.hash)
        except (PlanError, PlanRejectedError, ConfigError) as exc:
            return PlanReview(record, self._terms(record, None), (), str(exc))
        from fedcore.plans import describe_plan

        details = describe_plan(plan, train=record.train_config, secagg=record.secagg)
        return PlanReview(record, self._terms(record, plan), _lines(details))

    def _verify(self, digest: str) -> VerifiedPlan:
        assert self.queue is not None
        with self._lock:
            cached = self._verified.get(digest)
        if cached is not None:
            return cached
        from fedcore.plans import verify_program  # loads the verifier on first use

        verified = verify_program(self.queue.program(digest))
        with self._lock:
            self._verified[digest] = verified
            while len(self._verified) > _KEEP_VERIFIED:
                self._verified.popitem(last=False)
        return verified

    def _terms(
        self, record: PlanRequestRecord, plan: VerifiedPlan | None
    ) -> tuple[tuple[str, str], ...]:
        terms = record.terms
        rows: list[tuple[str, str]] = []
        if plan is not None:
            s = plan.summary
            rows.append(
                (
                    "The model",
                    f"a program of {s.nodes} operations taking {s.input} and giving {s.output}, "
                    f"with {s.num_parameters:,} trainable parameters; the verifier checked that "
                    "it can only compute on the batch and its weights (no files, network or "
                    "processes)",
                )
            )
        train = terms.train
        if terms.kind == "evaluate" or train is None:
            rows.append(("It asks to", "evaluate the model on this silo's data (no training)"))
            leaves = "the evaluation's loss and accuracy"
        else:
            rows.append(
                (
                    "It asks to",
                    f"train {train.epochs} local epoch(s) per round on this silo's data, in "
                    f"batches of {train.batch_size}, with {train.optimizer} at learning rate "
                    f"{train.learning_rate:g}",
                )
            )
            leaves = "the trained parameters (the model's update), never a record"
        if terms.secagg:
            leaves += "; masked by secure aggregation: the coordinator sees only the sum over silos"
        else:
            leaves += "; in the clear: the coordinator sees this silo's own update"
        rows.append(("What leaves the silo", leaves))
        extra = train.extra if train is not None else {}
        clip = extra.get(DP_CLIP_KEY)
        if clip is None:
            dp = "none asked for by the coordinator (this worker's own DP-SGD applies, if set)"
        else:
            noise = extra.get(DP_NOISE_MULTIPLIER_KEY)
            dp = f"client-level: each update clipped to L2 norm {clip:g}" + (
                f", Gaussian noise of multiplier {noise:g}" if noise else ", no noise added"
            )
        rows.append(("Differential privacy", dp))
        budget = self.policy.budget
        rows.append(
            (
                "Study",
                f"{budget.study} (budget epsilon {budget.epsilon:g} at delta {budget.delta:g})"
                if budget is not None
                else "no privacy budget is kept by this worker's policy",
            )
        )
        rows.append(("Who asked", f"the coordinator at {record.coordinator or '?'}"))
        rows.append(("Plan", f"{record.name} (hash {record.hash})"))
        return tuple(rows)

    def decide(
        self,
        rid: str,
        *,
        approve: bool,
        reason: str = "",
        lr_range: tuple[float, float] | None = None,
        rounds: int | None = None,
    ) -> PlanRequestRecord:
        """The owner's decision, written by the queue (as ``fed-worker requests`` does)."""
        if self.queue is None:
            raise ConfigError("this worker's policy does not ask for approvals")
        return self.queue.decide(
            rid, approve=approve, reason=reason, lr_range=lr_range, rounds=rounds
        )

    # ------------------------------------------------------------------ ledger

    def _ledgers(self) -> list[PrivacyLedger]:
        budget = self.policy.budget
        if budget is None:
            return []
        studies = PrivacyLedger(budget.ledger, study=budget.study).studies()
        return [PrivacyLedger(budget.ledger, study=s) for s in sorted({budget.study, *studies})]

    def ledgers(self) -> list[StudyLedger]:
        """Each study's epsilon after each charge (at the policy's delta)."""
        budget = self.policy.budget
        if budget is None:
            return []
        out = []
        for ledger in self._ledgers():
            charges = ledger.charges()
            out.append(
                StudyLedger(
                    ledger.study,
                    budget.delta,
                    budget.epsilon if ledger.study == budget.study else None,
                    self._curve(ledger.study, charges, budget.delta),
                    len(charges),
                )
            )
        return out

    def _curve(self, study: str, charges: list[Charge], delta: float) -> tuple[LedgerPoint, ...]:
        with self._lock:
            counted, points = self._curves.get(study, (0, ()))
        if counted > len(charges):  # a ledger restored from an older backup
            counted, points = 0, ()
        start = max(counted, len(charges) - MAX_PLOTTED_CHARGES)
        new = tuple(
            LedgerPoint(i + 1, epsilon_of(charges[: i + 1], delta=delta), charges[i].what)
            for i in range(start, len(charges))
        )
        points = (points + new)[-MAX_PLOTTED_CHARGES:]
        with self._lock:
            self._curves[study] = (len(charges), points)
        return points

    # ------------------------------------------------------------------ audit

    def audit(self, query: str = "") -> tuple[ChainStatus | None, list[AuditEvent]]:
        """Whether the audit log's chain verifies (None: no ``--audit-log``), and its entries,
        the requests' and decisions' history and every ledger charge, newest first, filtered
        by ``query`` (case-insensitive)."""
        chain, events = read_chain(self.audit_log) if self.audit_log else (None, [])
        for r in self.requests():
            events.append(
                AuditEvent(
                    r.requested_at,
                    "request",
                    f"request {r.id[:16]} for plan {r.hash[:16]} ({r.name}) in round {r.round} "
                    f"by {r.coordinator}",
                    "request queue",
                )
            )
            if r.decided_at is not None:
                events.append(
                    AuditEvent(
                        float(r.decided_at),
                        r.status,
                        f"request {r.id[:16]} {r.status}" + (f": {r.reason}" if r.reason else ""),
                        "request queue",
                    )
                )
        try:
            for ledger in self._ledgers():
                for i, c in enumerate(ledger.charges()):
                    events.append(
                        AuditEvent(
                            None,
                            "charge",
                            f"study {ledger.study} charge {i + 1}: {c.what} (noise multiplier "
                            f"{c.noise_multiplier:g}, sampling rate {c.sample_rate:g}, "
                            f"{c.steps} step(s))",
                            "privacy ledger",
                        )
                    )
        except LedgerError as exc:
            events.append(AuditEvent(time.time(), "error", str(exc)))
        needle = query.lower()
        events = [e for e in events if not needle or needle in f"{e.kind} {e.text}".lower()]
        # Charges carry no time: they follow the timed events, in ledger order.
        timed = sorted((e for e in events if e.time is not None), key=lambda e: -(e.time or 0))
        listed = timed + [e for e in reversed(events) if e.time is None]
        return chain, listed[:MAX_AUDIT_EVENTS]

    # ------------------------------------------------------------------ worker

    def now(self) -> WorkerNow:
        w = self.worker
        task = ""
        current = w.current
        if current is not None:
            task = (
                f"round {current.round}: {current.kind}, for "
                f"{max(time.time() - current.started, 0):.0f} s"
            )
        return WorkerNow(
            w.name, w.server, w.state.value, w.worker_id, w.tasks_done, w.tasks_refused, task
        )
