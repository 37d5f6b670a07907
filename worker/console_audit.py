"""The worker's hash-chained audit log (``fed-worker --audit-log``) as the owner's console
shows it: every entry, and whether the chain verifies, by the very check ``fed-worker audit
verify`` runs (:func:`fedcore.auditlog.verify`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fedcore.auditlog import verify

__all__ = ["AuditEvent", "ChainStatus", "read_chain"]

#: Fields of an entry shown as its kind and time, or that only link the chain.
_HEADER = frozenset({"time", "event", "prev", "hash"})
#: Characters of one entry's details shown at most.
_MAX_TEXT = 600


@dataclass(frozen=True)
class AuditEvent:
    """One line of the console's audit page; ``source`` says where it was read."""

    time: float | None
    kind: str
    text: str
    source: str = ""

    @property
    def clock(self) -> str:
        if self.time is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))


@dataclass(frozen=True)
class ChainStatus:
    """What :func:`~fedcore.auditlog.verify` says of the log: ``broken_at`` is the 1-based
    entry where the chain breaks (None: intact), ``verified`` the entries before it."""

    path: Path
    verified: int
    broken_at: int | None = None
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def _details(entry: dict[str, object]) -> str:
    parts = []
    for key, value in entry.items():
        if key in _HEADER or value is None or value == "":
            continue
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{key}={shown}")
    text = " ".join(parts)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def read_chain(path: Path) -> tuple[ChainStatus, list[AuditEvent]]:
    """The log's chain status and its entries in file order. Lines after a break are still
    listed (marked ``unverified``): the owner sees what the tampered part claims."""
    if not path.exists():  # nothing audited yet: the worker creates it at its first entry
        return ChainStatus(path, 0), []
    try:
        return _read(path)
    except OSError as exc:
        return ChainStatus(path, 0, 1, f"the file cannot be read ({exc.strerror or exc})"), []


def _read(path: Path) -> tuple[ChainStatus, list[AuditEvent]]:
    verified, problem = verify(path)
    status = ChainStatus(
        path,
        verified,
        problem.line if problem is not None else None,
        problem.reason if problem is not None else "",
    )
    events: list[AuditEvent] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            source = f"audit log #{number}"
            if status.broken_at is not None and number >= status.broken_at:
                source += " (unverified)"
            if not isinstance(entry, dict):
                text = raw.decode("utf-8", "replace").strip()[:_MAX_TEXT]
                events.append(AuditEvent(None, "unreadable", text, source))
                continue
            when = entry.get("time")
            events.append(
                AuditEvent(
                    float(when) if isinstance(when, int | float) else None,
                    str(entry.get("event", "?"))[:64],
                    _details(entry),
                    source,
                )
            )
    return status, events
