"""Crash recovery: the coordinator's state after each completed round, in one atomic file.

``--checkpoint-dir DIR`` makes the coordinator write ``DIR/checkpoint.safetensors`` after every
round: the global model, the round number, the metrics rows so far, and the state of every
stateful component (the strategy's ``state_dict()`` -- FedAdam's moments, FedAvgM's momentum,
a sampler's RNG -- and, with differential privacy, the accountant's). It is written to a temp
file, fsynced, renamed over the old one and the directory fsynced, so a SIGKILL at any moment
leaves either the previous round's checkpoint or this one, never a torn file.

The file is plain safetensors (nothing is pickled): model tensors under ``model/``, arrays found
in component state under ``state/N``, and everything else as JSON in the ``fedcore`` metadata
entry, where each array is replaced by ``{"__tensor__": "state/N"}``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedcore.atomic import write_atomically
from fedcore.errors import CheckpointError
from fedcore.weights import Weights

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "Checkpointer",
    "Stateful",
    "load_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger("fedcore.server")

CHECKPOINT_FILE = "checkpoint.safetensors"
_FORMAT = 1
_TENSOR = "__tensor__"


class Stateful(Protocol):
    """A component whose state survives a restart (a strategy, an accountant)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class Checkpoint:
    """What a restarted coordinator needs to go on after ``round``."""

    round: int
    weights: Weights
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # Component name ("strategy", "accountant") -> its state_dict().
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the run was (model, strategy): a checkpoint of another federation is refused.
    fingerprint: dict[str, str] = field(default_factory=dict)


class _Flattener:
    """Moves arrays out of nested state into named tensors, leaving JSON behind."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def flatten(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            key = f"state/{len(self.tensors)}"
            self.tensors[key] = np.ascontiguousarray(value)
            return {_TENSOR: key}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if _TENSOR in value:
                raise CheckpointError(f"state cannot use the reserved key {_TENSOR!r}")
            return {str(k): self.flatten(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.flatten(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise CheckpointError(
            f"cannot checkpoint a {type(value).__name__} in component state; state_dict() "
            "must hold numpy arrays, numbers, strings, lists and dicts"
        )


def _unflatten(value: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]].copy()
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically; return its path."""
    flattener = _Flattener()
    states = flattener.flatten(checkpoint.states)
    tensors = {f"model/{k}": np.ascontiguousarray(v) for k, v in checkpoint.weights.items()}
    tensors.update(flattener.tensors)
    meta = {
        "format": _FORMAT,
        "round": checkpoint.round,
        "metrics": checkpoint.metrics,
        "states": states,
        "fingerprint": checkpoint.fingerprint,
    }
    data = save_tensors(tensors, metadata={"fedcore": json.dumps(meta, allow_nan=True)})
    path = directory / CHECKPOINT_FILE
    write_atomically(path, data)
    return path


def _metadata(data: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError("truncated header")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError("bad metadata")
    return meta


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none yet."""
    path = directory / CHECKPOINT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    try:
        meta = json.loads(_metadata(data)["fedcore"])
        tensors = load_tensors(data)
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        return Checkpoint(
            round=int(meta["round"]),
            weights=weights,
            metrics=list(meta["metrics"]),
            states=_unflatten(meta["states"], tensors),
            fingerprint=dict(meta["fingerprint"]),
        )
    except CheckpointError as exc:
        raise CheckpointError(f"the checkpoint {path} is unusable: {exc}") from None
    except (KeyError, ValueError, TypeError, struct.error, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"the checkpoint {path} is unusable ({type(exc).__name__}: {exc}); move it away "
            "to start the federation from scratch"
        ) from None


class Checkpointer:
    """Writes a federation's checkpoints to ``directory`` and reads them back.

    Args:
        directory: ``--checkpoint-dir``.
        fingerprint: what the run is (model, strategy); a checkpoint of another run is refused.
        components: the stateful components by name (their ``state_dict()`` is saved).
    """

    def __init__(
        self, directory: Path, fingerprint: dict[str, str], components: dict[str, Stateful]
    ) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.components = components

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A deep copy of every component's state now."""
        return {
            name: copy.deepcopy(dict(component.state_dict()))
            for name, component in self.components.items()
        }

    def restore(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Load saved states into the components."""
        for name, component in self.components.items():
            state = states.get(name)
            if state is not None:
                component.load_state_dict(state)

    def load(self) -> Checkpoint | None:
        """The checkpoint of this run, None when there is none yet."""
        checkpoint = load_checkpoint(self.directory)
        if checkpoint is not None and checkpoint.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"the checkpoint in {self.directory} belongs to another federation "
                f"({checkpoint.fingerprint}, this one is {self.fingerprint}); use another "
                "--checkpoint-dir or the same --model/--model-params/--strategy"
            )
        return checkpoint

    async def save(
        self,
        round_number: int,
        weights: Weights,
        states: dict[str, dict[str, Any]],
        metrics: list[dict[str, Any]],
    ) -> None:
        """Write the checkpoint after ``round_number`` (in a thread: it fsyncs)."""
        checkpoint = Checkpoint(round_number, weights, metrics, states, self.fingerprint)
        path = await asyncio.to_thread(save_checkpoint, self.directory, checkpoint)
        log.info(
            "round %d checkpointed to %s",
            round_number,
            path,
            extra={"event": "checkpointed", "round": round_number},
        )
