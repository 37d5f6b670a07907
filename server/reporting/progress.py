"""What the coordinator shows while it runs: a live rich panel on a terminal, plain lines
otherwise, and a summary table at the end. Both are :class:`~.sink.Sink` s.

Plain mode (stdout not a terminal, or ``--progress plain``) keeps the output parseable: a
header line, one row per round, and ``summary key=value ...`` at the end.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .metrics import CoordinatorStatus, RoundMetrics

__all__ = [
    "LiveDisplay",
    "PlainSummary",
    "epsilon_of",
    "summary_line",
    "summary_table",
]


def epsilon_of(metrics: RoundMetrics | None) -> float | None:
    """The privacy budget spent so far, when the federation runs with differential privacy."""
    if metrics is None:
        return None
    value = metrics.to_json().get("epsilon")
    return float(value) if isinstance(value, int | float) else None


def _pct(v: float | None) -> str:
    return f"{100 * v:.2f}%" if v is not None else "-"


# Which summary columns a narrow terminal keeps first.
_PRIORITY = ("round", "workers", "failed", "accuracy", "loss", "elapsed s", "epsilon")


def _summary_columns(rows: Sequence[RoundMetrics]) -> list[tuple[str, list[str]]]:
    """The summary's columns (header, one cell per row), in display order."""
    columns: list[tuple[str, list[str]]] = [
        ("round", [str(m.round) for m in rows]),
        ("workers", [str(m.workers) for m in rows]),
    ]
    if any(m.failures for m in rows):
        columns.append(("failed", [str(m.failures) for m in rows]))
    columns += [
        ("accuracy", [_pct(m.test_accuracy) for m in rows]),
        ("loss", [f"{loss:.4f}" if (loss := m.test_loss) is not None else "-" for m in rows]),
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


def summary_table(rows: Sequence[RoundMetrics], width: int | None = None) -> Table:
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


def summary_line(rows: Sequence[RoundMetrics]) -> str:
    """One parseable line: ``summary rounds=5 accuracy=0.9865 ...``."""
    if not rows:
        return "summary rounds=0"
    last = rows[-1]
    parts = {
        "rounds": str(len(rows)),
        "accuracy": f"{last.test_accuracy:.4f}" if last.test_accuracy is not None else "-",
        "loss": f"{last.test_loss:.4f}" if last.test_loss is not None else "-",
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

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
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
            loss = last.test_loss
            result = Text(f"last round {last.round}: accuracy {_pct(last.test_accuracy)}")
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

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        self._live.stop()
        for handler, stream in self._restore:
            handler.setStream(stream)
        if rows:
            self.console.print(summary_table(rows, self.console.width))
        # Never wrapped: scripts and readers copy the line whole.
        self.console.print(summary_line(rows), markup=False, highlight=False, soft_wrap=True)
