"""Who is connected, with what data: the coordinator's roster (``Coordinator.roster()``).

``fed-server`` prints it as a table before the first round; the Python API returns
:class:`ConnectedWorker` records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedcore.data.metadata import DatasetMetadata

from ..state.registry import WorkerSession

__all__ = ["ConnectedWorker", "connected_workers", "format_roster"]


@dataclass(frozen=True)
class ConnectedWorker:
    """One connected worker as the coordinator sees it."""

    worker_id: str
    name: str
    num_examples: int
    state: str
    dataset: DatasetMetadata | None
    #: Required tags it lacks; empty when rounds may select it.
    missing_tags: tuple[str, ...]

    @property
    def selectable(self) -> bool:
        return not self.missing_tags


def connected_workers(sessions: Iterable[WorkerSession]) -> list[ConnectedWorker]:
    """Records of ``sessions``, sorted by name."""
    return sorted(
        (
            ConnectedWorker(
                s.worker_id, s.name, s.num_examples, s.state.value, s.dataset, s.missing_tags
            )
            for s in sessions
        ),
        key=lambda w: w.name,
    )


def format_roster(workers: list[ConnectedWorker], require_tags: tuple[str, ...] = ()) -> str:
    """A table: name, examples, dataset, tags, license, selected or not (and why)."""
    lines = [f"connected workers: {len(workers)}"]
    if require_tags:
        lines[0] += f" (selecting those tagged {' '.join('#' + t for t in require_tags)})"
    header = ("worker", "examples", "dataset", "tags", "license", "selected")
    rows = [header]
    for w in workers:
        d = w.dataset
        rows.append(
            (
                w.name,
                str(w.num_examples),
                d.name if d is not None else "-",
                " ".join("#" + t for t in d.tags) if d is not None and d.tags else "-",
                d.license if d is not None and d.license else "-",
                "yes"
                if w.selectable
                else "no (lacks " + " ".join("#" + t for t in w.missing_tags) + ")",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(lines)
