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


#: Rows the roster prints before it summarises (every worker not selected is still listed).
ROSTER_ROWS = 10


def format_roster(workers: list[ConnectedWorker], require_tags: tuple[str, ...] = ()) -> str:
    """A table: name, examples, dataset, tags, license, selected or not (and why).

    Past :data:`ROSTER_ROWS` workers it lists the first ones and every worker that is not
    selected, then one line for the rest: 100 simulated clients are not 100 rows.
    """
    lines = [f"connected workers: {len(workers)}"]
    if require_tags:
        lines[0] += f" (selecting those tagged {' '.join('#' + t for t in require_tags)})"
    shown = [w for i, w in enumerate(workers) if i < ROSTER_ROWS or not w.selectable]
    header = ("worker", "examples", "dataset", "tags", "license", "selected")
    rows = [header]
    for w in shown:
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
    rest = [w for i, w in enumerate(workers) if i >= ROSTER_ROWS and w.selectable]
    if rest:
        counts = sorted(w.num_examples for w in rest)
        lines.append(
            f"  ... and {len(rest)} more, all selected: {sum(counts)} examples "
            f"({counts[0]} to {counts[-1]} each); Coordinator.roster() lists every worker"
        )
    return "\n".join(lines)
