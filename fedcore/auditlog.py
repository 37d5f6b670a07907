"""Append-only, hash-chained audit logs (the coordinator's and each worker's).

One JSON object per line. Every entry carries ``prev``, the SHA-256 of the previous entry's
line (64 zeros for the first), and ``hash``, the SHA-256 of its own canonical JSON without
``hash``: editing, removing or reordering any line breaks the chain at that line, and editing
the last one breaks its own hash. :func:`verify` walks the file and names the first bad line.

A chain proves order and integrity against edits by anyone who does not rewrite every later
line; to pin the head, copy the last ``hash`` elsewhere (a ticket, another silo).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError

__all__ = ["GENESIS", "AuditLog", "AuditProblem", "verify"]

#: The ``prev`` of a log's first entry.
GENESIS = "0" * 64


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class AuditProblem:
    """Where a chain breaks: the 1-based line and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\n")


def verify(path: Path) -> tuple[int, AuditProblem | None]:
    """Check ``path``'s chain: the number of entries, and the first problem (None: intact)."""
    prev = GENESIS
    count = 0
    for number, raw in _lines(path):
        try:
            entry = json.loads(raw)
        except ValueError:
            return count, AuditProblem(number, "not a JSON object")
        if not isinstance(entry, dict):
            return count, AuditProblem(number, "not a JSON object")
        if entry.get("prev") != prev:
            return count, AuditProblem(
                number,
                "its 'prev' is not the SHA-256 of the line before (a line was edited, "
                "removed or moved)",
            )
        if entry.get("hash") != _entry_hash(entry):
            return count, AuditProblem(number, "its content does not match its 'hash' (edited)")
        prev = hashlib.sha256(raw).hexdigest()
        count += 1
    return count, None


class AuditLog:
    """An audit log file: :meth:`append` only. Each append is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = self._last_line_hash()

    def _last_line_hash(self) -> str:
        if not self.path.exists():
            return GENESIS
        last = b""
        for _, raw in _lines(self.path):
            if raw:
                last = raw
        return hashlib.sha256(last).hexdigest() if last else GENESIS

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry (``event`` plus JSON-serialisable ``fields``); the entry written."""
        entry: dict[str, Any] = {"time": round(time.time(), 3), "event": event, **fields}
        entry["prev"] = self._prev
        entry["hash"] = _entry_hash(entry)
        line = _canonical(entry)
        try:
            with self.path.open("ab") as f:
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise ConfigError(f"cannot write the audit log {self.path}: {exc.strerror}") from None
        self._prev = hashlib.sha256(line).hexdigest()
        return entry
