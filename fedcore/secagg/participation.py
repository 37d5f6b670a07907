"""Participation that cannot be replayed: the masked contributions a worker made, on disk.

Two secure sums over the same model whose survivor sets differ by one worker give that
worker's update by subtraction. So before a masked update leaves, the worker checks and
records, in a file that survives restarts (written atomically and fsynced *before* the upload):

* at most one contribution per signed (study, job, round): the coordinator cannot rerun a
  round whose keys the worker signed. The study is the worker's own (its policy's budget
  study), so two studies may each run a job's round 1, while the coordinator, which names
  the job, cannot rename the study;
* none over a model *near* one it already contributed over: a retry over the same weights
  moved by one ulp, or in a parameter that never affects the output, is refused as well.
  "Near" is a relative L2 distance ``||w - w'|| <= min_distance * ||w'||`` (the worker's
  ``--secagg-min-model-distance``), estimated on a count sketch of the model (linear, so the
  sketch of a difference is the difference of sketches; 512 buckets estimate a distance
  within about 10%), keyed by a secret the file keeps so a coordinator cannot aim a change at
  what the sketch does not see.

With distributed DP on (the plan's noise share, ``dp.min_updates``) a near repeat is a fresh
noisy release the accountant charges, so the worker may allow it (``allow_with_dp``). An
analytics query has no model: its signed round is recorded by its key alone (each answer is
a fresh noisy release charged to the ledger).

The model rule spans studies: renaming the study does not make a near-identical model new.
Records of version 1 (before the study was part of the key) are migrated on load: their
entries hold for *every* study, the safe reading of a record that did not say.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError, SecAggRefusedError

from .messages import RoundSetup

__all__ = ["ParticipationLog", "model_sketch"]

_VERSION = 2
#: Version-1 records: entries with no study, read as holding for every study.
_OLD_VERSIONS = (1,)
SKETCH_BUCKETS = 512
_BLOCK = 1 << 20


def model_sketch(model: npt.NDArray[np.floating], key: bytes) -> npt.NDArray[np.float64]:
    """A count sketch of ``model`` (flat) under ``key``: each coordinate goes, with a random
    sign, to one of :data:`SKETCH_BUCKETS` buckets (both drawn from ``key`` and the size)."""
    d = model.size
    seed = int.from_bytes(key, "big") ^ d
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.zeros(SKETCH_BUCKETS, np.float64)
    flat = model.reshape(-1)
    for start in range(0, d, _BLOCK):
        part = np.asarray(flat[start : start + _BLOCK], dtype=np.float64)
        buckets = rng.integers(0, SKETCH_BUCKETS, part.size)
        signs = rng.integers(0, 2, part.size) * 2 - 1
        out += np.bincount(buckets, weights=part * signs, minlength=SKETCH_BUCKETS)
    return out


@dataclass(frozen=True)
class _Entry:
    study: str | None  # None: a migrated version-1 entry, which holds for every study
    job: str
    round_number: int
    signed: bool
    size: int
    sketch: npt.NDArray[np.float64] | None  # None: no model (an analytics query)

    def same_round(self, study: str, setup: RoundSetup) -> bool:
        return (
            self.signed
            and self.study in (None, study)
            and (self.job, self.round_number) == (setup.job, setup.round_number)
        )

    def to_json(self) -> dict[str, Any]:
        sketch = self.sketch
        return {
            "study": self.study,
            "job": self.job,
            "round": self.round_number,
            "signed": self.signed,
            "size": self.size,
            "sketch": (
                None
                if sketch is None
                else base64.b64encode(sketch.astype("<f8").tobytes()).decode()
            ),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], version: int) -> _Entry:
        sketch = None
        if raw["sketch"] is not None:
            sketch = np.frombuffer(base64.b64decode(raw["sketch"]), "<f8").astype(np.float64)
            if sketch.size != SKETCH_BUCKETS:
                raise ValueError("a sketch of the wrong size")
        study = None if version in _OLD_VERSIONS or raw["study"] is None else str(raw["study"])
        return cls(
            study, str(raw["job"]), int(raw["round"]), bool(raw["signed"]), int(raw["size"]), sketch
        )


class ParticipationLog:
    """The contributions of one worker, kept in ``path``.

    Args:
        path: the JSON file (created on first use; keep it with the worker's other state).
        study: this worker's study (its policy's budget study; "" without one).
        min_distance: refuse a model within this relative L2 distance of one already
            contributed over (0 refuses only the same model).
        allow_with_dp: allow such a repeat when the round adds distributed DP noise.
    """

    def __init__(
        self, path: Path, *, study: str = "", min_distance: float, allow_with_dp: bool = False
    ) -> None:
        if not min_distance >= 0:
            raise ConfigError(f"the minimum model distance must be >= 0, got {min_distance}")
        self.path = path
        self.study = study
        self.min_distance = min_distance
        self.allow_with_dp = allow_with_dp
        self._key, self._entries = self._load()
        # Tasks of several jobs (and queries) admit from their own threads: each check and
        # its record are one step, or two near-identical models could both pass.
        self._lock = threading.Lock()

    def _load(self) -> tuple[bytes, list[_Entry]]:
        if not self.path.exists():
            return os.urandom(16), []
        try:
            raw = json.loads(self.path.read_text("utf-8"))
            version = raw.get("version")
            if version != _VERSION and version not in _OLD_VERSIONS:
                raise ValueError(
                    f"version {version!r}, this fedcore reads versions up to {_VERSION}"
                )
            key = bytes.fromhex(raw["key"])
            entries = [_Entry.from_json(e, version) for e in raw["contributions"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh on a damaged record: that would forget every contribution.
            raise ConfigError(
                f"cannot read the participation record {self.path}: {exc}; restore it from a "
                "backup (deleting it lets a coordinator replay past rounds)"
            ) from None
        return key, entries

    def __len__(self) -> int:
        return len(self._entries)

    def admit(
        self, setup: RoundSetup, model: npt.NDArray[np.floating] | None, *, distributed_dp: bool
    ) -> None:
        """Record a contribution in this round (over ``model``, the flat global weights; None
        for a query), on disk; raise :class:`SecAggRefusedError` if the round, or a model
        near this one, was already used."""
        with self._lock:
            self._admit(setup, model, distributed_dp=distributed_dp)

    def _admit(
        self, setup: RoundSetup, model: npt.NDArray[np.floating] | None, *, distributed_dp: bool
    ) -> None:
        if setup.signed:
            for e in self._entries:
                if e.same_round(self.study, setup):
                    raise SecAggRefusedError(
                        f"this worker already contributed to round {setup.round_number} of job "
                        f"{setup.job!r} in study {self.study!r}; a second masked input would "
                        "let two sums be subtracted"
                    )
        sketch = None if model is None else model_sketch(model, self._key)
        if sketch is not None and model is not None and not (distributed_dp and self.allow_with_dp):
            self._refuse_near(sketch, model.size)
        entry = _Entry(
            self.study,
            setup.job,
            setup.round_number,
            setup.signed,
            0 if model is None else model.size,
            sketch,
        )
        self._entries.append(entry)
        document = {
            "version": _VERSION,
            "key": self._key.hex(),
            "contributions": [e.to_json() for e in self._entries],
        }
        write_atomically(self.path, (json.dumps(document) + "\n").encode(), mode=0o600)

    def _refuse_near(self, sketch: npt.NDArray[np.float64], size: int) -> None:
        """Refuse a model near one already contributed over, in any study."""
        scale = max(float(np.linalg.norm(sketch)), 1e-12)
        for e in self._entries:
            if e.sketch is None or e.size != size:
                continue
            distance = float(np.linalg.norm(sketch - e.sketch))
            if distance <= self.min_distance * max(float(np.linalg.norm(e.sketch)), scale):
                raise SecAggRefusedError(
                    f"this worker already sent a masked update over a model within relative "
                    f"distance {self.min_distance:g} of this one (about {distance / scale:.2g}); "
                    "a retry over a nearly unchanged model would isolate one worker's update"
                )
