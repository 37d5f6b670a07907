"""The data owner's plan request queue: plans waiting for a decision, and the decisions.

Kept by the worker (``worker/plans.py`` queues, ``fed-worker requests`` decides) and read
by ``fed-plan show HASH``.

One folder per plan hash under the queue's root (the policy's ``[plans] requests``)::

    plan-requests/<hash>/plan.bin        the PlanProgram as received (protobuf, never pickled)
    plan-requests/<hash>/request.json    when and how it was asked for (written once)
    plan-requests/<hash>/decision.json   approved or denied, why, when (written by the owner)

The worker only ever creates a request; ``fed-worker requests approve|deny`` only ever writes
a decision. Both write a temporary file and rename it, so a reader never sees half a file
and the queue survives restarts. A decision is pinned to the hash: a plan that changes in any
operation, weight shape or constant is another plan, and waits again.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedcore.errors import ConfigError, PlanError
from fedcore.plan import TrainConfig
from fedcore.policy import load_policy
from fedcore.v1 import fedcore_pb2 as pb

from .format import plan_hash

__all__ = ["PlanRequestRecord", "RequestQueue", "Status", "queue_from"]

Status = Literal["pending", "approved", "denied"]
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PlanRequestRecord:
    """One plan in the queue."""

    hash: str
    name: str
    status: Status
    requested_at: float
    round: int
    train: dict[str, Any]
    secagg: bool
    reason: str = ""
    decided_at: float | None = None

    @property
    def train_config(self) -> TrainConfig | None:
        try:
            return TrainConfig(**self.train) if self.train else None
        except (TypeError, ConfigError):
            return None

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.requested_at))
        text = f"{self.hash[:16]}  {self.status:<8}  {when}  {self.name!r}"
        return text + (f"  ({self.reason})" if self.reason else "")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class RequestQueue:
    """The queue at ``root`` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, digest: str) -> Path:
        if not _HASH.fullmatch(digest):
            raise ConfigError(f"{digest!r} is not a plan hash (64 hex digits)")
        return self.root / digest

    def get(self, digest: str) -> PlanRequestRecord | None:
        """The request for ``digest`` and its decision, or None if never requested."""
        folder = self._dir(digest)
        try:
            request = json.loads((folder / "request.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"plan request {folder} is unreadable: {exc}") from None
        decision: dict[str, Any] = {}
        try:
            decision = json.loads((folder / "decision.json").read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise ConfigError(f"decision on plan {digest[:16]} is unreadable: {exc}") from None
        status = decision.get("status", "pending")
        if status not in ("approved", "denied"):
            status = "pending"
        return PlanRequestRecord(
            hash=digest,
            name=str(request.get("name", "")),
            status=status,
            requested_at=float(request.get("requested_at", 0.0)),
            round=int(request.get("round", 0)),
            train=dict(request.get("train", {})),
            secagg=bool(request.get("secagg", False)),
            reason=str(decision.get("reason", "")),
            decided_at=decision.get("decided_at"),
        )

    def submit(self, program: pb.PlanProgram, task: pb.Task) -> PlanRequestRecord:
        """Queue ``program`` (already verified) as ``task`` asked for it; idempotent."""
        digest = program.hash
        folder = self._dir(digest)
        existing = self.get(digest)
        if existing is not None:
            return existing
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plan.bin.tmp").write_bytes(program.SerializeToString())
        os.replace(folder / "plan.bin.tmp", folder / "plan.bin")
        train = {}
        if task.kind == pb.TASK_KIND_FIT:
            config = TrainConfig.from_proto(task.train)
            train = {
                "epochs": config.epochs,
                "batch_size": config.batch_size,
                "optimizer": config.optimizer,
                "learning_rate": config.learning_rate,
                "momentum": config.momentum,
                "weight_decay": config.weight_decay,
                "seed": config.seed,
                "extra": dict(config.extra),
            }
        _write_json(
            folder / "request.json",
            {
                "hash": digest,
                "name": program.name,
                "requested_at": time.time(),
                "round": task.round,
                "train": train,
                "secagg": task.HasField("secagg"),
            },
        )
        record = self.get(digest)
        assert record is not None
        return record

    def list(self) -> list[PlanRequestRecord]:
        """Every request, oldest first."""
        if not self.root.is_dir():
            return []
        records = [
            self.get(p.name) for p in self.root.iterdir() if p.is_dir() and _HASH.fullmatch(p.name)
        ]
        return sorted((r for r in records if r is not None), key=lambda r: r.requested_at)

    def find(self, prefix: str) -> PlanRequestRecord:
        """The one request whose hash starts with ``prefix``."""
        matches = [r for r in self.list() if r.hash.startswith(prefix.lower())]
        if not prefix or not matches:
            raise ConfigError(f"no plan request matches {prefix!r} in {self.root}")
        if len(matches) > 1:
            raise ConfigError(f"{prefix!r} matches {len(matches)} plan requests; give more digits")
        return matches[0]

    def program(self, digest: str) -> pb.PlanProgram:
        """The queued program, checked against its hash."""
        program = pb.PlanProgram()
        try:
            program.ParseFromString((self._dir(digest) / "plan.bin").read_bytes())
        except Exception as exc:  # unreadable or not protobuf
            raise PlanError(f"queued plan {digest[:16]} is unreadable: {exc}") from None
        if plan_hash(program) != digest:
            raise PlanError(f"queued plan {digest[:16]} does not match its hash")
        return program

    def decide(self, digest: str, *, approve: bool, reason: str = "") -> PlanRequestRecord:
        """Approve or deny the plan of hash ``digest`` (the data owner's command)."""
        if self.get(digest) is None:
            raise ConfigError(f"no request for plan {digest[:16]} in {self.root}")
        _write_json(
            self._dir(digest) / "decision.json",
            {
                "status": "approved" if approve else "denied",
                "reason": reason,
                "decided_at": time.time(),
            },
        )
        record = self.get(digest)
        assert record is not None
        return record


def queue_from(policy: Path | None, queue: Path | None) -> RequestQueue:
    """The queue ``--queue DIR`` names, or the one a worker policy's ``[plans] requests`` does."""
    if queue is not None:
        return RequestQueue(queue)
    if policy is None:
        raise ConfigError("give --policy POLICY.toml (its [plans] requests) or --queue DIR")
    rules = load_policy(policy).plans
    assert rules.requests is not None  # the parser always sets it
    return RequestQueue(rules.requests)
