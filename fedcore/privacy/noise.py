"""Gaussian noise for the sum of clipped updates: central and distributed.

Central mode: the coordinator adds ``N(0, (z C)^2)`` to the sum of the clipped updates.
Distributed mode: each of the workers adds ``N(0, (z C)^2 / m)`` to its own clipped update
before secure aggregation masks it, so nobody ever sees an un-noised sum. ``m`` is the
fewest updates a round may aggregate (``--min-results``): if ``n >= m`` updates survive, the
sum carries variance ``n (z C)^2 / m >= (z C)^2`` — over-provisioning the noise so that the
guarantee survives dropouts; the accountant charges the effective multiplier
``z sqrt(n / m)``. A round with fewer than ``m`` updates is never released.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

__all__ = [
    "add_gaussian_noise",
    "distributed_noise_std",
    "effective_noise_multiplier",
    "secure_generator",
]


def secure_generator() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG (never from a fixed seed)."""
    return np.random.default_rng(secrets.randbits(128))


def add_gaussian_noise(update: Weights, std: float, rng: np.random.Generator) -> None:
    """Add ``N(0, std^2)`` to every coordinate of the floating tensors of ``update`` (in place)."""
    if std < 0 or not math.isfinite(std):
        raise ConfigError(f"the noise standard deviation must be finite and >= 0, got {std}")
    if std == 0:
        return
    for array in update.values():
        if array.dtype.kind == "f":
            noise = rng.normal(0.0, std, size=array.shape)
            np.add(array, noise, out=array, casting="unsafe")


def distributed_noise_std(*, noise_multiplier: float, clip_norm: float, min_updates: int) -> float:
    """Each worker's share of the noise so that any ``min_updates`` shares sum to ``z C``."""
    if min_updates < 1:
        raise ConfigError(f"distributed noise needs min_updates >= 1, got {min_updates}")
    return noise_multiplier * clip_norm / math.sqrt(min_updates)


def effective_noise_multiplier(
    *, noise_multiplier: float, aggregated: int, min_updates: int
) -> float:
    """The multiplier a distributed-noise sum of ``aggregated`` shares actually carries."""
    if aggregated < min_updates:
        raise ConfigError(
            f"only {aggregated} noised updates arrived, {min_updates} are needed for the "
            "promised noise; the round must not be released"
        )
    return noise_multiplier * math.sqrt(aggregated / min_updates)
