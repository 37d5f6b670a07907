"""Per-round metrics: a JSON line each in ``--metrics-out``, a table row on the console, and the
final model in safetensors format; and :class:`CoordinatorStatus`, the progress snapshot."""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from safetensors.numpy import save

from fedcore.weights import Weights

__all__ = ["CoordinatorStatus", "MetricsWriter", "RoundMetrics", "save_weights"]


@dataclass
class RoundMetrics:
    """Everything recorded about one completed round."""

    round: int
    workers: int
    failures: int
    duration_s: float
    bytes_sent: int
    bytes_received: int
    accuracy: float | None = None
    loss: float | None = None
    attempts: int = 1
    fit_s: float = 0.0
    eval_s: float = 0.0
    # Wall clock of training from the start of round 1 to this round's model, summed over
    # the runs of a --resume'd federation (time between runs is not counted).
    elapsed_s: float = 0.0
    peak_rss_bytes: int = 0
    train: dict[str, float] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)
    # Asynchronous mode only: mean/max staleness of the buffered results, and results dropped
    # for being older than the maximum staleness.
    staleness: dict[str, float] | None = None
    #: Workers whose policy refused the round's plan: name -> the reason they gave.
    refused: dict[str, str] = field(default_factory=dict)
    # Differential privacy only: epsilon spent so far at delta (client-level), and the details
    # (noise multiplier, clip norm, sampling rate, updates aggregated; DP-SGD silos' own
    # (epsilon, delta) under "silos").
    epsilon: float | None = None
    delta: float | None = None
    privacy: dict[str, Any] | None = None
    #: The hash of the plan trained, when the model is shipped as one (fed-server --ship-plan).
    plan: str | None = None

    @property
    def test_accuracy(self) -> float | None:
        """Centralized test accuracy, else the federated evaluation's; None when neither ran."""
        return self.accuracy if self.accuracy is not None else self.federated.get("accuracy")

    @property
    def test_loss(self) -> float | None:
        """Centralized test loss, else the federated evaluation's; None when neither ran."""
        return self.loss if self.loss is not None else self.federated.get("loss")

    def cells(self) -> dict[str, str]:
        """The round as table cells by column name (console rows, the summary table)."""
        accuracy, loss = self.test_accuracy, self.test_loss
        return {
            "round": str(self.round),
            "workers": str(self.workers),
            "accuracy": f"{100 * accuracy:.2f}%" if accuracy is not None else "-",
            "loss": f"{loss:.4f}" if loss is not None else "-",
            "train loss": f"{self.train['loss']:.4f}" if "loss" in self.train else "-",
            "fit s": f"{self.fit_s:.1f}",
            "eval s": f"{self.eval_s:.1f}",
            "elapsed s": f"{self.elapsed_s:.1f}",
            "sent MB": f"{self.bytes_sent / 1e6:.1f}",
            "recv MB": f"{self.bytes_received / 1e6:.1f}",
        }

    def scalars(self) -> dict[str, float]:
        """The round's numbers as named series for experiment trackers (MLflow, TensorBoard):
        ``test/accuracy``, ``train/loss``, ``federated/...``, ``round/...``, ``privacy/...``;
        non-finite values are left out."""
        series: dict[str, float | None] = {
            "test/accuracy": self.test_accuracy,
            "test/loss": self.test_loss,
            "round/workers": self.workers,
            "round/failures": self.failures,
            "round/fit_s": self.fit_s,
            "round/eval_s": self.eval_s,
            "round/elapsed_s": self.elapsed_s,
            "round/bytes_sent": self.bytes_sent,
            "round/bytes_received": self.bytes_received,
            "privacy/epsilon": self.epsilon,
        }
        series.update({f"train/{k}": v for k, v in self.train.items()})
        series.update({f"federated/{k}": v for k, v in self.federated.items()})
        series.update({f"staleness/{k}": v for k, v in (self.staleness or {}).items()})
        return {k: float(v) for k, v in series.items() if v is not None and math.isfinite(v)}

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        for optional in ("staleness", "epsilon", "delta", "privacy", "plan"):
            if getattr(self, optional) is None:
                del row[optional]
        row["train"] = {k: _finite(v) for k, v in self.train.items()}
        row["federated"] = {k: _finite(v) for k, v in self.federated.items()}
        return row


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


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


class MetricsWriter:
    """A :class:`~.sink.Sink` that writes each round as it completes: JSONL to a file
    (flushed), a table row to ``out``."""

    _COLUMNS = (
        "round",
        "workers",
        "accuracy",
        "loss",
        "train loss",
        "fit s",
        "eval s",
        "sent MB",
        "recv MB",
    )

    def __init__(self, path: Path | None, out: IO[str] | None = sys.stdout) -> None:
        self._file = path.open("w", encoding="utf-8") if path else None
        self._out = out
        self._header_printed = False

    def restore(self, rows: Sequence[RoundMetrics]) -> None:
        """Start from the rows of a checkpoint (``--resume``): the file is rewritten with
        them, so a round that ran after the checkpoint is not counted twice."""
        for row in rows:
            if self._file is not None:
                self._file.write(json.dumps(row.to_json()) + "\n")
        if self._file is not None:
            self._file.flush()

    def update(self, status: CoordinatorStatus) -> None:
        pass

    def round_completed(self, metrics: RoundMetrics) -> None:
        if self._file is not None:
            self._file.write(json.dumps(metrics.to_json()) + "\n")
            self._file.flush()
        if self._out is None:
            return
        if not self._header_printed:
            # Header names without spaces: each line splits into fields.
            header = (c.replace(" ", "_") for c in self._COLUMNS)
            print("".join(f"{c:>11}" for c in header), file=self._out, flush=True)
            self._header_printed = True
        cells = metrics.cells()
        print("".join(f"{cells[c]:>11}" for c in self._COLUMNS), file=self._out, flush=True)

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def save_weights(weights: Weights, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write weights in the safetensors format (atomically: temp file, then rename); the same
    weights and metadata give the same bytes (:func:`canonical_safetensors`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(canonical_safetensors(save(dict(weights.items()), metadata=metadata)))
    tmp.replace(path)


def canonical_safetensors(blob: bytes) -> bytes:
    """``blob`` with its JSON header's keys sorted. The safetensors library writes the
    metadata from a hash map, in an order that changes from run to run, so two identical
    models would not hash alike; the data offsets are relative to the end of the header, so
    rewriting it (padded with spaces to 8 bytes, as the format recommends) moves nothing."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + size :]
