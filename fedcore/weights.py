"""Model weights as plain numpy arrays, and the signature two sides must agree on.

``Weights`` is an insertion-ordered ``dict`` from parameter name to array: the order is the
wire order. The coordinator never needs torch to hold or combine weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.errors import ModelMismatchError

__all__ = [
    "ModelSignature",
    "TensorSignature",
    "Weights",
    "check_signature",
    "describe_mismatch",
    "signature_digest",
    "signature_of",
    "total_bytes",
]

# Any dtype: a tensor of any numeric type; Any (not np.generic) so that a dict of float32
# arrays is a Weights too (dict is invariant in its values).
Weights = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class TensorSignature:
    """Name, dtype (numpy name such as ``"float32"``) and shape of one parameter."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def num_bytes(self) -> int:
        return self.num_elements * np.dtype(self.dtype).itemsize

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


ModelSignature = tuple[TensorSignature, ...]


def signature_of(weights: Mapping[str, npt.NDArray[np.generic]]) -> ModelSignature:
    """The signature of a set of weights, in their order."""
    return tuple(
        TensorSignature(name, array.dtype.name, tuple(int(d) for d in array.shape))
        for name, array in weights.items()
    )


def total_bytes(signature: Iterable[TensorSignature]) -> int:
    """Bytes needed to hold every tensor of a signature."""
    return sum(t.num_bytes for t in signature)


def num_parameters(signature: Iterable[TensorSignature]) -> int:
    """Number of scalar parameters of a signature."""
    return sum(t.num_elements for t in signature)


def signature_digest(signature: Iterable[TensorSignature]) -> str:
    """A short stable digest of a signature, for logs and quick comparisons."""
    h = hashlib.sha256()
    for t in signature:
        h.update(f"{t.name}|{t.dtype}|{','.join(map(str, t.shape))};".encode())
    return h.hexdigest()[:16]


def describe_mismatch(expected: ModelSignature, actual: ModelSignature) -> str | None:
    """Say in words how ``actual`` differs from ``expected``; None when they are equal."""
    if expected == actual:
        return None
    expected_names = {t.name: t for t in expected}
    actual_names = {t.name: t for t in actual}
    missing = [n for n in expected_names if n not in actual_names]
    unexpected = [n for n in actual_names if n not in expected_names]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing parameters {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected parameters {_short_list(unexpected)}")
        return "; ".join(parts)
    for want in expected:
        got = actual_names[want.name]
        if got != want:
            return f"parameter {want.name!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    return "parameters are in a different order"


def check_signature(expected: ModelSignature, actual: ModelSignature, *, context: str) -> None:
    """Raise :class:`ModelMismatchError` naming the first difference, if any."""
    problem = describe_mismatch(expected, actual)
    if problem is not None:
        raise ModelMismatchError(f"{context}: {problem}")


def _short_list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
