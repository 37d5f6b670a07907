"""The Gaussian mechanism of a query, and each silo's share of its noise.

A query releases the vector of :mod:`.layout`, each sum divided by its sensitivity: L2
sensitivity ``sqrt(k)``. For a requested ``(epsilon, delta)`` the noise multiplier ``z`` is
calibrated with Google's ``dp-accounting`` (Rényi DP, :func:`calibrate_noise_multiplier`),
and the scaled vector gets Gaussian noise of standard deviation ``z * sqrt(k)`` on every word:
the release is one Gaussian mechanism of multiplier ``z``, charged to each silo's ledger as
``Charge(noise_multiplier=z)`` next to its training rounds.

The noise is *distributed*: each of the ``n`` silos adds ``N(0, z^2 k / n)`` to its own
scaled sums before secure aggregation masks them, so the unmasked total carries the whole
variance and nobody, coordinator included, ever sees an un-noised sum. That holds while every
silo adds its share (an honest-but-curious coordinator, authenticated workers); the
secure round's threshold is ``n``, so nothing is unmasked unless all ``n`` shares are in.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError
from fedcore.policy.ledger import Charge, epsilon_of
from fedcore.privacy.accountant import calibrate_noise_multiplier

from .layout import Layout

__all__ = ["charge_for", "epsilon_for", "noise_multiplier_for", "noise_share", "noise_std"]


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier of one Gaussian release that costs at most ``epsilon``
    at ``delta`` (by the same accountant the ledger uses).

    Raises:
        ConfigError: epsilon not positive and finite, or delta not in (0, 1).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a positive number, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)


def charge_for(noise_multiplier: float, what: str) -> Charge:
    """The ledger entry of one query release."""
    return Charge(noise_multiplier=noise_multiplier, what=what[:200])


def epsilon_for(noise_multiplier: float, delta: float) -> float:
    """What one release of multiplier ``noise_multiplier`` costs at ``delta``."""
    return epsilon_of([Charge(noise_multiplier=noise_multiplier)], delta=delta)


def noise_std(layout: Layout, noise_multiplier: float) -> npt.NDArray[np.float64]:
    """The standard deviation of the total noise on each released sum (in the sum's units)."""
    return noise_multiplier * math.sqrt(layout.touched) * layout.scale_vector()


def noise_share(
    layout: Layout, noise_multiplier: float, silos: int, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """One silo's share of the noise, in *scaled* units (each sum divided by its
    sensitivity): ``N(0, z^2 k / silos)`` per word."""
    if silos < 1:
        raise ConfigError(f"a query needs at least one silo, got {silos}")
    std = noise_multiplier * math.sqrt(layout.touched / silos)
    return rng.normal(0.0, std, size=layout.words)
