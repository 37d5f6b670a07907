"""What the coordinator shows while it runs: a live rich panel on a terminal, plain lines
otherwise, and a summary table at the end.

The coordinator publishes a :class:`CoordinatorStatus` snapshot a few times a second and every
completed round's :class:`~fedcore.server.reporting.RoundMetrics` to its *observers* (this
module's displays, the Prometheus exporter). Observers never reach into the coordinator.

Plain mode (stdout not a terminal, or ``--progress plain``) keeps the output parseable: a
header line, one row per round, and ``summary key=value ...`` at the end.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import IO, Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .reporting import RoundMetrics

__all__ = [
    "CoordinatorStatus",
    "LiveDisplay",
    "Observer",
    "PlainSummary",
    "epsilon_of",
    "summary_line",
    "summary_table",
]


@dataclass(frozen=True)
class CoordinatorStatus:
    """A snapshot of a running federation."""

    phase: str  # "waiting for workers", "training", "finished"
    round: int  # the round in progress (the last one once finished); 0 before round 1
    rounds: int
    connected: int
    training: int  # workers given this round's training task
    reported: int  # valid results received so far this round
    min_workers: int
    bytes_sent: int
    bytes_received: int
    elapsed_s: float  # since round 1 started (0 before)
    last: RoundMetrics | None  # the last completed (and evaluated) round
    # Rounds whose global model exists, counted when aggregated (their evaluation may still
    # be running: it overlaps the next round).
    rounds_completed: int = 0


class Observer(Protocol):
    """Receives the coordinator's status and completed rounds (all calls on the event loop)."""

    def update(self, status: CoordinatorStatus) -> None: ...

    def round_completed(self, metrics: RoundMetrics) -> None: ...

    def close(self, status: CoordinatorStatus, rows: list[RoundMetrics]) -> None: ...


def epsilon_of(metrics: RoundMetrics | None) -> float | None:
    """The privacy budget spent so far, when the federation runs with differential privacy."""
    if metrics is None:
        return None
    value = metrics.to_json().get("epsilon")
    return float(value) if isinstance(value, int | float) else None


def _accuracy(m: RoundMetrics) -> float | None:
    return m.accuracy if m.accuracy is not None else m.federated.get("accuracy")


def _loss(m: RoundMetrics) -> float | None:
    return m.loss if m.loss is not None else m.federated.get("loss")


def _pct(v: float | None) -> str:
    return f"{100 * v:.2f}%" if v is not None else "-"


# Which summary columns a narrow terminal keeps first.
_PRIORITY = ("round", "workers", "failed", "accuracy", "loss", "elapsed s", "epsilon")


def _summary_columns(rows: list[RoundMetrics]) -> list[tuple[str, list[str]]]:
    """The summary's columns (header, one cell per row), in display order."""
    columns: list[tuple[str, list[str]]] = [
        ("round", [str(m.round) for m in rows]),
        ("workers", [str(m.workers) for m in rows]),
    ]
    if any(m.failures for m in rows):
        columns.append(("failed", [str(m.failures) for m in rows]))
    columns += [
        ("accuracy", [_pct(_accuracy(m)) for m in rows]),
        ("loss", [f"{loss:.4f}" if (loss := _loss(m)) is not None else "-" for m in rows]),
        ("train loss", [f"{m.train['loss']:.4f}" if "loss" in m.train else "-" for m in rows]),
        ("fit s", [f"{m.fit_s:.1f}" for m in rows]),
        ("eval s", [f"{m.eval_s:.1f}" for m in rows]),
        ("elapsed s", [f"{m.elapsed_s:.1f}" for m in rows]),
        ("sent MB", [f"{m.bytes_sent / 1e6:.1f}" for m in rows]),
        ("recv MB", [f"{m.bytes_received / 1e6:.1f}" for m in rows]),
    ]
    if any(epsilon_of(m) is not None for m in rows):
        columns.append(
            ("epsilon", [f"{e:.3f}" if (e := epsilon_of(m)) is not None else "-" for m in rows])
        )
    return columns


def summary_table(rows: list[RoundMetrics], width: int | None = None) -> Table:
    """The end-of-run table: one row per round. Within ``width`` columns it keeps the columns
    that fit whole, the most important first, rather than cutting every cell short."""
    columns = _summary_columns(rows)
    if width is not None:
        ranked = sorted(
            columns,
            key=lambda c: _PRIORITY.index(c[0]) if c[0] in _PRIORITY else len(_PRIORITY),
        )
        used, kept = 1, set()  # the left border; each column adds its padding and a border
        for header, cells in ranked:
            cost = max(len(header), *(len(c) for c in cells)) + 3
            if used + cost <= width:
                used += cost
                kept.add(header)
        columns = [c for c in columns if c[0] in kept]
    table = Table(title="federation summary", title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for i in range(len(rows)):
        table.add_row(*(cells[i] for _, cells in columns))
    return table


def summary_line(rows: list[RoundMetrics]) -> str:
    """One parseable line: ``summary rounds=5 accuracy=0.9865 ...``."""
    if not rows:
        return "summary rounds=0"
    last = rows[-1]
    parts = {
        "rounds": str(len(rows)),
        "accuracy": f"{_accuracy(last):.4f}" if _accuracy(last) is not None else "-",
        "loss": f"{_loss(last):.4f}" if _loss(last) is not None else "-",
        "elapsed_s": f"{last.elapsed_s:.1f}",
        "bytes_sent": str(sum(m.bytes_sent for m in rows)),
        "bytes_received": str(sum(m.bytes_received for m in rows)),
    }
    eps = epsilon_of(last)
    if eps is not None:
        parts["epsilon"] = f"{eps:.4f}"
    return "summary " + " ".join(f"{k}={v}" for k, v in parts.items())


class PlainSummary:
    """Plain mode: the per-round rows come from the metrics writer; this adds the summary."""

    def __init__(self, out: IO[str] = sys.stdout) -> None:
        self._out = out

    def update(self, status: CoordinatorStatus) -> None:
        pass

    def round_completed(self, metrics: RoundMetrics) -> None:
        pass

    def close(self, status: CoordinatorStatus, rows: list[RoundMetrics]) -> None:
        print(summary_line(rows), file=self._out, flush=True)


class LiveDisplay:
    """A live panel on the terminal, redrawn in place, and the summary table at the end."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._rows: list[RoundMetrics] = []
        self._live = Live(
            Text("starting..."), console=self.console, auto_refresh=False, transient=True
        )
        self._live.start()
        # Log records go through the live display's stderr proxy, above the panel, instead of
        # tearing it apart.
        self._restore: list[tuple[logging.StreamHandler[Any], Any]] = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                self._restore.append((handler, handler.stream))
                handler.setStream(sys.stderr)

    def render(self, status: CoordinatorStatus) -> Group:
        """The panel for ``status`` (public for tests)."""
        head = Text()
        head.append(f"round {status.round} of {status.rounds}", style="bold")
        head.append(f"  {status.phase}")
        head.append(f"  {status.elapsed_s:.0f} s")
        done = len(self._rows)
        filled = round(30 * done / status.rounds) if status.rounds else 0
        bar = Text()
        bar.append("█" * filled, style="green")
        bar.append("░" * (30 - filled), style="dim")
        bar.append(f" {done}/{status.rounds} rounds done")
        workers = Text(
            f"workers: {status.connected} connected (need {status.min_workers}), "
            f"{status.reported}/{status.training} reported this round"
        )
        last = status.last
        if last is None:
            result = Text("no round completed yet")
        else:
            loss = _loss(last)
            result = Text(f"last round {last.round}: accuracy {_pct(_accuracy(last))}")
            if loss is not None:
                result.append(f", loss {loss:.4f}")
            eps = epsilon_of(last)
            if eps is not None:
                result.append(f", epsilon {eps:.3f}")
        traffic = Text(
            f"traffic: {status.bytes_sent / 1e6:.1f} MB sent, "
            f"{status.bytes_received / 1e6:.1f} MB received"
        )
        return Group(head, bar, workers, result, traffic)

    def update(self, status: CoordinatorStatus) -> None:
        self._live.update(self.render(status), refresh=True)

    def round_completed(self, metrics: RoundMetrics) -> None:
        self._rows.append(metrics)

    def close(self, status: CoordinatorStatus, rows: list[RoundMetrics]) -> None:
        self._live.stop()
        for handler, stream in self._restore:
            handler.setStream(stream)
        if rows:
            self.console.print(summary_table(rows, self.console.width))
        # Never wrapped: scripts and readers copy the line whole.
        self.console.print(summary_line(rows), markup=False, highlight=False, soft_wrap=True)
