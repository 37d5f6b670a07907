"""Frozen parameters: the part of a model that is never trained, and so travels only once.

A federation declares which parameters are *trainable* (name patterns, or what the model's
factory left ``requires_grad``, as ``peft`` does for LoRA adapters); everything else in the
model's state is *frozen*. Rounds move and aggregate only the trainable parameters. The frozen
ones are identified by a content digest (:func:`frozen_digest`): a worker keeps them in a
:class:`FrozenCache` under that digest, or loads them from a file its data owner names, and
the coordinator sends them only to a worker that does not hold them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError, PayloadError
from fedcore.weights import ModelSignature, TensorSignature, Weights

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "FROM_MODEL",
    "FrozenCache",
    "frozen_digest",
    "is_digest",
    "load_frozen_file",
    "split_weights",
    "trainable_names",
    "verify_frozen",
]

log = logging.getLogger("fedcore.frozen")

#: The trainable pattern meaning "the parameters the model factory left ``requires_grad``".
FROM_MODEL = "@requires-grad"

_DIGEST_CHARS = frozenset("0123456789abcdef")


def trainable_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The state entries of ``model`` that ``patterns`` make trainable, in state order.

    A pattern is an ``fnmatch`` pattern on state names (``"net.3.*"``) or :data:`FROM_MODEL`.
    A pattern that matches nothing is an error (a typo would silently freeze the model).
    """
    state = list(model.state_dict())
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == FROM_MODEL:
            matched = {name for name, p in model.named_parameters() if p.requires_grad}
        else:
            matched = set(fnmatch.filter(state, pattern))
        if not matched:
            raise ConfigError(
                f"trainable pattern {pattern!r} matches no parameter of the model; "
                f"its parameters are {state[:6]}{' ...' if len(state) > 6 else ''}"
            )
        chosen |= matched
    names = [name for name in state if name in chosen]
    if not names:
        raise ConfigError("the trainable patterns leave nothing to train")
    return names


def split_weights(
    weights: Mapping[str, npt.NDArray[np.generic]], trainable: Iterable[str]
) -> tuple[Weights, Weights]:
    """``(trainable, frozen)`` parts of ``weights``, each in the weights' order (no copies)."""
    keep = set(trainable)
    return (
        {n: a for n, a in weights.items() if n in keep},
        {n: a for n, a in weights.items() if n not in keep},
    )


def frozen_digest(weights: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """Hex SHA-256 of tensors sorted by name: ``name|dtype|d0,d1;`` then their LE bytes.

    Sorted, so the digest of a file does not depend on the order its tensors are stored in.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        array = np.asarray(weights[name])
        le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        h.update(f"{name}|{array.dtype.name}|{','.join(map(str, array.shape))};".encode())
        h.update(le.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def is_digest(text: str) -> bool:
    """Whether ``text`` is a hex SHA-256 as :func:`frozen_digest` writes it."""
    return len(text) == 64 and set(text) <= _DIGEST_CHARS


def _check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise PayloadError(f"frozen parameters digest {digest[:80]!r} is not a hex SHA-256")
    return digest


def _conform(weights: Weights, signature: ModelSignature, what: str) -> Weights:
    """``weights`` in ``signature``'s order, after checking it names exactly those tensors."""
    out: Weights = {}
    for spec in signature:
        array = weights.get(spec.name)
        if array is None or array.dtype.name != spec.dtype or tuple(array.shape) != spec.shape:
            raise PayloadError(f"{what} has no tensor {spec}")
        out[spec.name] = array
    if len(out) != len(weights):
        extra = sorted(set(weights) - set(out))
        raise PayloadError(f"{what} holds tensors the plan does not freeze: {extra[:4]}")
    return out


def load_frozen_file(path: Path) -> Weights:
    """Frozen parameters from a safetensors file the data owner names (read as numpy)."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (OSError, ValueError) as exc:  # safetensors raises its own error type, a ValueError
        raise ConfigError(f"cannot read frozen parameters from {path}: {exc}") from None


class FrozenCache:
    """Frozen parameters on disk, verified on load: per digest, ``<digest>.bin`` (the tensors'
    little-endian bytes) and ``<digest>.json`` (their names, dtypes and shapes, in order).

    Written through temporary files and renames, the ``.bin`` last, so a crash leaves no torn
    entry under a digest's name.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use {directory} for frozen parameters: {exc}") from None

    def _path(self, digest: str) -> Path:
        return self.directory / f"{_check_digest(digest)}.bin"

    def digests(self) -> list[str]:
        """The digests held (by file name; contents are verified when loaded)."""
        return sorted(
            p.stem
            for p in self.directory.glob("*.bin")
            if len(p.stem) == 64
            and set(p.stem) <= _DIGEST_CHARS
            and p.with_suffix(".json").exists()
        )

    def store(self, digest: str, weights: Weights) -> None:
        """Keep ``weights`` under ``digest`` (the caller verified the digest)."""
        path = self._path(digest)
        layout = [[name, a.dtype.name, list(a.shape)] for name, a in weights.items()]
        self._write(path.with_suffix(".json"), [json.dumps(layout).encode()])
        self._write(
            path,
            (
                np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                .reshape(-1)
                .view(np.uint8)
                .data
                for a in weights.values()
            ),
        )

    def _write(self, path: Path, pieces: Iterable[bytes | memoryview]) -> None:
        write_atomically(path, pieces)

    def _signature(self, path: Path) -> ModelSignature:
        try:
            layout = json.loads(path.read_text())
            return tuple(
                TensorSignature(str(name), np.dtype(dtype).name, tuple(int(d) for d in shape))
                for name, dtype, shape in layout
            )
        except (OSError, ValueError, TypeError) as exc:
            raise PayloadError(f"unreadable cache entry {path}: {exc}") from None

    def load(self, digest: str) -> Weights | None:
        """The entry for ``digest``; None if absent. An entry whose content does not hash to
        its digest is deleted (so it is fetched again) and refused."""
        path = self._path(digest)
        if not path.exists():
            return None
        try:
            signature = self._signature(path.with_suffix(".json"))
        except PayloadError:
            signature = ()
        buffer = np.fromfile(path, dtype=np.uint8)
        weights: Weights = {}
        offset = 0
        for spec in signature:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            if offset + spec.num_bytes > buffer.size:
                break
            array = np.frombuffer(buffer, dtype=dtype, count=spec.num_elements, offset=offset)
            weights[spec.name] = array.reshape(spec.shape)
            offset += spec.num_bytes
        if (
            not signature
            or offset != buffer.size
            or len(weights) != len(signature)
            or frozen_digest(weights) != digest
        ):
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            raise PayloadError(
                f"the cached frozen parameters {digest[:12]} in {self.directory} are damaged "
                "(their content does not match their digest); deleted, they will be fetched again"
            )
        return weights


def verify_frozen(weights: Weights, digest: str, signature: ModelSignature, what: str) -> Weights:
    """``weights`` in the plan's order if they hash to ``digest``; PayloadError otherwise."""
    conformed = _conform(weights, signature, what)
    actual = frozen_digest(conformed)
    if actual != _check_digest(digest):
        raise PayloadError(
            f"{what} have digest {actual[:12]}, the plan's frozen parameters have {digest[:12]}"
        )
    return conformed
