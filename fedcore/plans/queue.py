"""The data owner's plan request queue: plans waiting for a decision, and the decisions.

Kept by the worker (``worker/plans.py`` queues, ``fed-worker requests`` decides) and read
by ``fed-plan show HASH``.

A request is a plan *and the terms it is to run under* (:class:`Terms`: the task kind, local
epochs, batch size, optimizer and its settings, every strategy number the task carries
(client-level DP's clip norm and noise multiplier among them), secure aggregation on or off,
and the learning rate). The owner approves a request, not a hash: a training task of an
approved plan under other terms is another request, which waits for its own decision. An
evaluation task trains nothing and follows the decision on the plan's training (it makes a
request of its own only for a plan never asked about). An approval
may widen the learning rate to a range (``--lr-range``) and bound the rounds it covers
(``--rounds``). Layout under the queue's root (the policy's ``[plans] requests``)::

    plan-requests/programs/<hash>.bin         each PlanProgram once (protobuf, never pickled)
    plan-requests/<id>/request.json           the plan's hash, its terms, who asked and when
    plan-requests/<id>/decision.json          approved or denied, why, when, the lr range
    plan-requests/<id>/used.json              rounds run under the current approval

Under ``[jobs] approval = "always"`` every job waits here too, not only shipped plans: its
request (:meth:`RequestQueue.submit_job`) is the job (:class:`JobOrigin`: its id, the data
scientist who asked and the study, as the coordinator says, the model or plan, and for an
analytics query the query itself) under the same terms, and stores no program; its "hash" is
the digest of the :class:`JobOrigin`.

``<id>`` is the SHA-256 of the plan's hash and its terms. The worker only ever creates a
request and counts rounds; ``fed-worker requests approve|deny`` only ever writes a decision.
Every file is written to a temporary name and renamed, so a reader never sees half a file
and the queue survives restarts. The queue has caps (:class:`QueueCaps`): undecided
requests, bytes of stored programs, and new requests per coordinator per day; a request
past a cap is not stored, and the refusal says which cap and what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError, PlanError
from fedcore.plan import TrainConfig
from fedcore.policy import PlanRules, load_policy
from fedcore.sanitize import printable
from fedcore.v1 import fedcore_pb2 as pb

from .format import plan_hash

__all__ = [
    "JobOrigin",
    "PlanRequestRecord",
    "QueueCaps",
    "QueueFull",
    "RequestQueue",
    "Status",
    "Terms",
    "caps_of",
    "queue_from",
    "request_id",
]

Status = Literal["pending", "approved", "denied"]
_HASH = re.compile(r"[0-9a-f]{64}")
_DAY = 24 * 3600.0


class QueueFull(PlanError):
    """A new request was not stored: the queue is at one of its caps."""


@dataclass(frozen=True)
class QueueCaps:
    """How much the queue holds (``[plans] max-pending``, ``max-queue-bytes``,
    ``max-requests-per-day``)."""

    max_pending: int = 16
    max_bytes: int = 256 * 1024 * 1024
    max_per_day: int = 16


#: The training settings a request pins, as stored (TrainConfig's fields of these names), and
#: their values in the terms of an evaluation task, which trains nothing.
_UNTRAINED: dict[str, Any] = {
    "epochs": 0,
    "batch_size": 0,
    "optimizer": "",
    "learning_rate": 0.0,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "extra": {},
}


@dataclass(frozen=True)
class Terms:
    """What a task asks to do with a plan, as the data owner approves it: its kind, secure
    aggregation on or off, and for training the :class:`TrainConfig` (epochs, batch size,
    optimizer and its numbers, learning rate, and every strategy number of the task in
    ``extra``: client-level DP, FedProx, compression)."""

    kind: str  # "fit" or "evaluate"
    secagg: bool
    train: TrainConfig | None = None

    @classmethod
    def of(cls, task: pb.Task) -> Terms:
        secagg = task.HasField("secagg")
        if task.kind != pb.TASK_KIND_FIT:
            return cls("evaluate", secagg)
        return cls("fit", secagg, _pinned(TrainConfig.from_proto(task.train)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Terms:
        kind = str(data.get("kind", ""))
        secagg = bool(data.get("secagg", False))
        if kind != "fit":
            return cls(kind, secagg)
        values = {k: type(v)(data.get(k, v)) for k, v in _UNTRAINED.items() if k != "extra"}
        extra = {str(k): float(v) for k, v in dict(data.get("extra", {})).items()}
        try:
            return cls(kind, secagg, TrainConfig(**values, extra=dict(sorted(extra.items()))))
        except ConfigError as exc:
            raise PlanError(f"a stored request's terms are invalid: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The stored form, one flat object (the request id hashes it)."""
        train = self.train
        pinned = {k: v if train is None else getattr(train, k) for k, v in _UNTRAINED.items()}
        return {"kind": self.kind, "secagg": self.secagg, **pinned}

    @property
    def learning_rate(self) -> float:
        return self.train.learning_rate if self.train is not None else 0.0

    def but_lr(self) -> dict[str, Any]:
        """These terms with the learning rate left out (an approval may give it a range)."""
        return {**self.to_json(), "learning_rate": 0.0}

    def differences(self, other: Terms) -> list[str]:
        """What changed from ``other`` to these terms, one short phrase each."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k]]

    def train_config(self) -> TrainConfig | None:
        return self.train


def _pinned(config: TrainConfig) -> TrainConfig:
    """``config`` with only what a request pins (no seed, no trainable list)."""
    values = {k: getattr(config, k) for k in _UNTRAINED if k != "extra"}
    return TrainConfig(**values, extra=dict(sorted(config.extra.items())))


@dataclass(frozen=True)
class JobOrigin:
    """A job as its data owner approves it (``[jobs] approval = "always"``): the job, who
    asked and in which study (the coordinator's claims, shown as such), what it runs (a model
    name, a plan's hash) and, for an analytics query, the query and its privacy terms."""

    job: str
    scientist: str
    study: str
    model: str = ""
    plan: str = ""
    query: str = ""
    epsilon: float = 0.0
    delta: float = 0.0

    @classmethod
    def of_task(cls, task: pb.Task) -> JobOrigin:
        # The coordinator's words reach the owner's terminal and logs: printable, bounded.
        return cls(
            printable(task.job_id, 64),
            printable(task.scientist, 128),
            printable(task.study, 128),
            model=printable(task.model.name, 256),
            plan=printable(task.plan.hash, 64) if task.HasField("plan") else "",
        )

    @classmethod
    def of_query(cls, task: pb.QueryTask) -> JobOrigin:
        return cls(
            printable(task.job_id, 64),
            printable(task.scientist, 128),
            printable(task.study, 128),
            query=printable(task.query, 4096),
            epsilon=float(task.epsilon),
            delta=float(task.delta),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobOrigin:
        return cls(
            str(data.get("job", "")),
            str(data.get("scientist", "")),
            str(data.get("study", "")),
            model=str(data.get("model", "")),
            plan=str(data.get("plan", "")),
            query=str(data.get("query", "")),
            epsilon=float(data.get("epsilon", 0.0)),
            delta=float(data.get("delta", 0.0)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "scientist": self.scientist,
            "study": self.study,
            "model": self.model,
            "plan": self.plan,
            "query": self.query,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }

    def digest(self) -> str:
        """What stands for a plan's hash in the job's requests (64 hex digits)."""
        canonical = json.dumps({"job-request": self.to_json()}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def title(self) -> str:
        """One line for ``fed-worker requests list``."""
        job = f"job {self.job[:16]}" if self.job else "a one-shot federation"
        who = f" by {self.scientist!r} (study {self.study!r})" if self.scientist else ""
        what = f": query {self.query[:60]!r}" if self.query else f": model {self.model[:40]}"
        return job + who + what


def request_id(digest: str, terms: Terms) -> str:
    """A request's id: the plan's hash and its terms, hashed together."""
    canonical = json.dumps({"hash": digest, "terms": terms.to_json()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class PlanRequestRecord:
    """One request in the queue: a plan, its terms, the owner's decision."""

    id: str
    hash: str
    name: str
    status: Status
    requested_at: float
    round: int
    terms: Terms
    coordinator: str = ""
    reason: str = ""
    decided_at: float | None = None
    #: the approved learning rates (the requested one unless the owner widened it)
    lr_range: tuple[float, float] | None = None
    #: rounds (fit tasks) the approval covers; None: no bound
    rounds: int | None = None
    used: int = 0
    #: A job's request (``[jobs] approval = "always"``); None: a plan's.
    job: JobOrigin | None = None

    @property
    def secagg(self) -> bool:
        return self.terms.secagg

    @property
    def train_config(self) -> TrainConfig | None:
        return self.terms.train_config()

    def covers(self, terms: Terms) -> bool:
        """An approved request whose terms (and learning-rate range) cover ``terms``."""
        if self.status != "approved" or self.terms.but_lr() != terms.but_lr():
            return False
        low, high = self.lr_range or (self.terms.learning_rate, self.terms.learning_rate)
        return low <= terms.learning_rate <= high

    @property
    def rounds_left(self) -> int | None:
        return None if self.rounds is None else max(self.rounds - self.used, 0)

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.requested_at))
        if self.job is not None:
            text = f"{self.id[:16]}  {self.status:<8}  {when}  {self.job.title()}"
            return text + (f"  ({self.reason!r})" if self.reason else "")
        text = f"{self.id[:16]}  plan {self.hash[:16]}  {self.status:<8}  {when}  {self.name!r}"
        return text + (f"  ({self.reason!r})" if self.reason else "")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


class RequestQueue:
    """The queue at ``root`` (created on first use), within ``caps``."""

    def __init__(self, root: Path, caps: QueueCaps | None = None) -> None:
        self.root = root
        self.caps = caps or QueueCaps()

    def _dir(self, rid: str) -> Path:
        if not _HASH.fullmatch(rid):
            raise ConfigError(f"{rid!r} is not a request id (64 hex digits)")
        return self.root / rid

    def _program_path(self, digest: str) -> Path:
        if not _HASH.fullmatch(digest):
            raise ConfigError(f"{digest!r} is not a plan hash (64 hex digits)")
        return self.root / "programs" / f"{digest}.bin"

    def get(self, rid: str) -> PlanRequestRecord | None:
        """The request ``rid`` and its decision, or None if there is none."""
        folder = self._dir(rid)
        request = _read_json(folder / "request.json", "plan request")
        if request is None:
            return None
        decision = _read_json(folder / "decision.json", "decision") or {}
        used = _read_json(folder / "used.json", "round count") or {}
        status = decision.get("status", "pending")
        if status not in ("approved", "denied"):
            status = "pending"
        lr = decision.get("lr_range")
        rounds = decision.get("rounds")
        job = request.get("job")
        return PlanRequestRecord(
            id=rid,
            hash=str(request.get("hash", "")),
            name=str(request.get("name", "")),
            status=status,
            requested_at=float(request.get("requested_at", 0.0)),
            round=int(request.get("round", 0)),
            terms=Terms.from_json(dict(request.get("terms", {}))),
            coordinator=str(request.get("coordinator", "")),
            reason=str(decision.get("reason", "")),
            decided_at=decision.get("decided_at"),
            lr_range=(float(lr[0]), float(lr[1]))
            if isinstance(lr, list) and len(lr) == 2
            else None,
            rounds=int(rounds) if isinstance(rounds, int) else None,
            # Rounds count under the current decision only: a new decision starts again.
            used=int(used.get("count", 0))
            if used.get("decided_at") == decision.get("decided_at")
            else 0,
            job=JobOrigin.from_json(job) if isinstance(job, dict) else None,
        )

    def for_plan(self, digest: str) -> list[PlanRequestRecord]:
        """Every request for the plan of hash ``digest``, oldest first."""
        return [r for r in self.list() if r.hash == digest]

    def lookup(self, digest: str, terms: Terms) -> PlanRequestRecord | None:
        """The request that decides ``terms`` for plan ``digest``: an approval covering them
        (with rounds left first), else the request for exactly these terms, else None."""
        requests = self.for_plan(digest)
        if terms.kind == "evaluate" and requests:
            # Evaluation trains nothing: the owner's decision on the plan's training decides
            # it (an approval under any terms; else the latest request's status).
            approved = [r for r in requests if r.status == "approved"]
            return approved[-1] if approved else requests[-1]
        approved = [r for r in requests if r.covers(terms)]
        approved.sort(key=lambda r: r.rounds_left != 0, reverse=True)
        if approved:
            return approved[0]
        return self.get(request_id(digest, terms))

    def submit(
        self, program: pb.PlanProgram, task: pb.Task, *, coordinator: str = ""
    ) -> PlanRequestRecord:
        """Queue ``program`` (already verified) under ``task``'s terms; idempotent.

        Raises:
            QueueFull: a cap would be exceeded; nothing was stored.
        """
        digest = program.hash
        terms = Terms.of(task)
        rid = request_id(digest, terms)
        existing = self.get(rid)
        if existing is not None:
            return existing
        self._check_caps(program, coordinator)
        program_path = self._program_path(digest)
        if not program_path.exists():
            write_atomically(program_path, program.SerializeToString())
        folder = self._dir(rid)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(
            folder / "request.json",
            {
                "id": rid,
                "hash": digest,
                "name": program.name,
                "requested_at": time.time(),
                "round": task.round,
                "coordinator": coordinator,
                "terms": terms.to_json(),
            },
        )
        record = self.get(rid)
        assert record is not None
        return record

    def submit_job(
        self, origin: JobOrigin, terms: Terms, *, round: int = 0, coordinator: str = ""
    ) -> PlanRequestRecord:
        """Queue job ``origin`` under ``terms`` (``[jobs] approval = "always"``); idempotent.

        Raises:
            QueueFull: a cap would be exceeded; nothing was stored.
        """
        digest = origin.digest()
        rid = request_id(digest, terms)
        existing = self.get(rid)
        if existing is not None:
            return existing
        self._check_caps(None, coordinator)
        folder = self._dir(rid)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(
            folder / "request.json",
            {
                "id": rid,
                "hash": digest,
                "name": origin.title(),
                "requested_at": time.time(),
                "round": round,
                "coordinator": coordinator,
                "terms": terms.to_json(),
                "job": origin.to_json(),
            },
        )
        record = self.get(rid)
        assert record is not None
        return record

    def _check_caps(self, program: pb.PlanProgram | None, coordinator: str) -> None:
        records = self.list()
        pending = sum(r.status == "pending" for r in records)
        if pending >= self.caps.max_pending:
            raise QueueFull(
                f"the data owner's request queue is full: {pending} requests await a decision "
                f"(at most {self.caps.max_pending}); this one was not queued until the owner "
                "decides on those (fed-worker requests list)"
            )
        since = time.time() - _DAY
        recent = sum(r.coordinator == coordinator and r.requested_at > since for r in records)
        if recent >= self.caps.max_per_day:
            raise QueueFull(
                f"this coordinator made {recent} plan requests in the last 24 hours, the most "
                f"the data owner accepts ({self.caps.max_per_day}); this one was not queued"
            )
        programs = self.root / "programs"
        stored = (
            sum(p.stat().st_size for p in programs.iterdir() if p.suffix == ".bin")
            if programs.is_dir()
            else 0
        )
        if program is None:  # a job's request stores no program
            return
        size = 0 if self._program_path(program.hash).exists() else program.ByteSize()
        if stored + size > self.caps.max_bytes:
            raise QueueFull(
                f"the data owner's request queue is full: it holds {stored:,} bytes of plans "
                f"and this one takes {size:,} (at most {self.caps.max_bytes:,}); it was not "
                "queued"
            )

    def count_round(self, record: PlanRequestRecord) -> None:
        """One more round (fit task) ran under ``record``'s current approval."""
        decision = _read_json(self._dir(record.id) / "decision.json", "decision") or {}
        _write_json(
            self._dir(record.id) / "used.json",
            {"decided_at": decision.get("decided_at"), "count": record.used + 1},
        )

    def list(self) -> list[PlanRequestRecord]:
        """Every request, oldest first."""
        if not self.root.is_dir():
            return []
        records = [
            self.get(p.name) for p in self.root.iterdir() if p.is_dir() and _HASH.fullmatch(p.name)
        ]
        return sorted((r for r in records if r is not None), key=lambda r: r.requested_at)

    def find(self, prefix: str) -> PlanRequestRecord:
        """The one request whose id, or whose plan's hash, starts with ``prefix``."""
        prefix = prefix.lower()
        records = self.list()
        matches = [r for r in records if r.id.startswith(prefix)] if prefix else []
        if not matches and prefix:
            matches = [r for r in records if r.hash.startswith(prefix)]
        if not matches:
            raise ConfigError(f"no plan request matches {prefix!r} in {self.root}")
        if len(matches) > 1:
            ids = ", ".join(r.id[:16] for r in matches[:8])
            raise ConfigError(
                f"{prefix!r} matches {len(matches)} plan requests ({ids}); give a request id"
            )
        return matches[0]

    def program(self, digest: str) -> pb.PlanProgram:
        """The queued program, checked against its hash."""
        program = pb.PlanProgram()
        try:
            program.ParseFromString(self._program_path(digest).read_bytes())
        except Exception as exc:  # unreadable or not protobuf
            raise PlanError(f"queued plan {digest[:16]} is unreadable: {exc}") from None
        if plan_hash(program) != digest:
            raise PlanError(f"queued plan {digest[:16]} does not match its hash")
        return program

    def decide(
        self,
        rid: str,
        *,
        approve: bool,
        reason: str = "",
        lr_range: tuple[float, float] | None = None,
        rounds: int | None = None,
    ) -> PlanRequestRecord:
        """Approve or deny request ``rid`` (the data owner's command)."""
        record = self.get(rid)
        if record is None:
            raise ConfigError(f"no plan request {rid[:16]} in {self.root}")
        if lr_range is not None:
            low, high = lr_range
            if not 0 < low <= high:
                raise ConfigError(
                    f"the learning-rate range must be 0 < LOW <= HIGH, got {lr_range}"
                )
        if rounds is not None and rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {rounds}")
        decision: dict[str, Any] = {
            "status": "approved" if approve else "denied",
            "reason": reason,
            "decided_at": time.time(),
        }
        if approve and lr_range is not None:
            decision["lr_range"] = list(lr_range)
        if approve and rounds is not None:
            decision["rounds"] = rounds
        _write_json(self._dir(rid) / "decision.json", decision)
        record = self.get(rid)
        assert record is not None
        return record


def queue_from(policy: Path | None, queue: Path | None) -> RequestQueue:
    """The queue ``--queue DIR`` names, or the one a worker policy's ``[plans] requests`` does."""
    if queue is not None:
        return RequestQueue(queue)
    if policy is None:
        raise ConfigError(
            "give --policy POLICY.toml (its [plans] requests) or --queue DIR (the worker's log "
            "names it), or run from the folder of the worker's policy.toml"
        )
    rules = load_policy(policy).plans
    assert rules.requests is not None  # the parser always sets it
    return RequestQueue(rules.requests, caps_of(rules))


def caps_of(rules: PlanRules) -> QueueCaps:
    """The caps a policy's ``[plans]`` section sets."""
    return QueueCaps(rules.max_pending, rules.max_queue_bytes, rules.max_requests_per_day)
