"""Gaussian noise for the sum of clipped updates: central and distributed.

Central mode: the coordinator adds ``N(0, (z C)^2)`` to the sum of the clipped updates.
Distributed mode: each of the workers adds ``N(0, (z C)^2 / m)`` to its own clipped update
before secure aggregation masks it, so nobody ever sees an un-noised sum. ``m`` is the
fewest updates a round may aggregate (``--min-results``): if ``n >= m`` updates survive, the
sum carries variance ``n (z C)^2 / m >= (z C)^2`` — over-provisioning the noise so that the
guarantee survives dropouts; the accountant charges the effective multiplier
``z sqrt(n / m)``. A round with fewer than ``m`` updates is never released.

Under secure aggregation the distributed share is exact integer noise instead
(:func:`add_ring_noise`): the update is rounded to the ring's grid and a discrete Gaussian is
added there (:mod:`.discrete`), so no floating-point noise is sampled (issue 22, item 7).
Central mode does the same on the coordinator, with one share, on a grid of
:func:`central_step`.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .discrete import IntegerNoise, check_sum_slack, discrete_gaussian

__all__ = [
    "IntegerNoise",
    "add_gaussian_noise",
    "add_ring_noise",
    "central_step",
    "distributed_noise_std",
    "effective_noise_multiplier",
    "secure_generator",
]


# The central grid: 2^-20 of the clip norm, so rounding adds 2 sqrt(d) 2^-20 to the
# sensitivity in clip norms (0.2% more noise for a million parameters).
_CENTRAL_GRID = 2.0**-20


def central_step(*, clip_norm: float, float_error: float) -> float:
    """The grid the coordinator rounds the clipped sum to in central mode: ``2^-20 C``, or
    twice the sum's floating-point error per coordinate if that is coarser, so that error
    stays within the half step :func:`add_ring_noise`'s sensitivity allows for it."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"the clip norm must be positive and finite, got {clip_norm}")
    if not (float_error >= 0 and math.isfinite(float_error)):
        raise ConfigError(f"the float error bound must be finite and >= 0, got {float_error}")
    return max(clip_norm * _CENTRAL_GRID, 2 * float_error)


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


def add_ring_noise(
    update: Weights,
    *,
    noise_multiplier: float,
    sensitivity: float,
    shares: int,
    step: float,
    sampler: IntegerNoise = discrete_gaussian,
) -> float:
    """Round the floating tensors of ``update`` (in place) to multiples of ``step`` (one
    unit of the secure-aggregation ring) and add a discrete Gaussian share there; return its
    parameter in ring units.

    The rounded vector ``u`` has integer L2 sensitivity ``sensitivity / step + 2 sqrt(d)``
    (rounding moves each of the ``d`` words by 1/2, float error by less than another 1/2);
    the share ``N_Z(0, sigma^2)``, ``sigma = z * that / sqrt(shares)``, makes any ``shares``
    honest shares one mechanism of multiplier ``z`` (:mod:`.discrete`). The result
    ``(u + noise) * step`` is a grid point: the masking re-encodes it (post-processing).

    Raises:
        ConfigError: the grid is so fine that the noise overflows 64-bit integers, or the
            shares so small that their sum is not accounted (:func:`.check_sum_slack`).
    """
    if not (step > 0 and math.isfinite(step)):
        raise ConfigError(f"the ring's step must be positive and finite, got {step}")
    arrays = [a for a in update.values() if a.dtype.kind == "f"]
    size = sum(a.size for a in arrays)
    if size == 0:
        return 0.0
    sigma = noise_multiplier * (sensitivity / step + 2 * math.sqrt(size)) / math.sqrt(shares)
    check_sum_slack(sigma, shares, size)
    noise = sampler(sigma, size)
    offset = 0
    for array in arrays:
        flat = array.reshape(-1)
        # Clipped to 2^52 ring units so the rounding stays exact in float64 (1-Lipschitz).
        words = np.rint(np.clip(flat.astype(np.float64) / step, -(2.0**52), 2.0**52))
        words += noise[offset : offset + flat.size]
        np.multiply(words, step, out=words)
        np.copyto(array, words.reshape(array.shape), casting="unsafe")
        offset += flat.size
    return sigma


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
