"""The Gaussian mechanism of a query, and each silo's share of its noise.

A query releases the vector of :mod:`.layout`, each sum divided by its scale, of L2
sensitivity ``Delta`` (:attr:`~.layout.Layout.sensitivity`, one row replaced). For a
requested ``(epsilon, delta)`` the noise multiplier ``z`` is calibrated with Google's
``dp-accounting`` (Rényi DP, :func:`calibrate_noise_multiplier`) and charged to each silo's
ledger as ``Charge(noise_multiplier=z)`` next to its training rounds.

**Exact integer noise.** The vector is summed in the fixed-point ring of secure aggregation
(:data:`~.encoding.FIXED_POINT`, ``s`` ring units per unit), so each silo rounds its scaled
sums to ring integers ``u`` itself and adds a *discrete* Gaussian there
(:mod:`fedcore.privacy.discrete`). Rounding moves each coordinate by at most 1/2, and the
floating-point error of the sums by at most another 1/2 for tables under 2^27 rows, so
``u`` has integer L2 sensitivity ``Delta_int = Delta * s + 2 sqrt(d)`` (``d`` words). The
whole noise has parameter ``sigma = z * Delta_int``; the value it is added to is an integer,
so the release is exactly the CKS20 mechanism the charge accounts. Everything after (the
float the ring word is read back into, stochastic rounding, masking) is post-processing.

**Distributed, against the silo's own assumptions** (issue 22). Each silo adds
``N_Z(0, sigma^2 / h)`` with ``h = min(honest-silos, silos claimed)`` from *its own*
policy (:class:`~fedcore.policy.model.NoiseNetwork`): any ``h`` honest shares carry the
whole variance, whatever number of silos the coordinator claims. The default ``h = 1``
adds the whole noise alone. The secure round's threshold is the number of silos, so
nothing is unmasked unless every share is in.

**Error bars from the noise actually added.** Each silo states its share's ``sigma^2`` in
its acceptance (:func:`share_variance`; the discrete Gaussian's variance is at most its
``sigma^2``, CKS20 Prop. 19); the answer's standard errors are the square root of their sum
(:func:`answer_noise_std`), so silos that trust fewer others widen the bars as much as they
widen the noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError
from fedcore.policy.ledger import Charge, epsilon_of
from fedcore.privacy.accountant import calibrate_noise_multiplier
from fedcore.privacy.discrete import check_sum_slack, discrete_gaussian
from fedcore.secagg.quantize import FixedPoint

from .encoding import FIXED_POINT
from .layout import Layout

__all__ = [
    "answer_noise_std",
    "charge_for",
    "epsilon_for",
    "noise_multiplier_for",
    "noise_std",
    "noisy_share",
    "ring_sensitivity",
    "ring_share_sigma",
    "share_variance",
    "total_noise_std",
]


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
    # Rényi DP, as the ledger charges it: the discrete Gaussian's privacy is proven in
    # concentrated DP (Canonne, Kamath, Steinke 2020), not by the continuous Gaussian's exact
    # curve, so the tighter PLD calibration would under-charge and disagree with the ledger.
    return calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1, mechanism="rdp"
    )


def charge_for(noise_multiplier: float, what: str) -> Charge:
    """The ledger entry of one query release."""
    return Charge(noise_multiplier=noise_multiplier, what=what[:200])


def epsilon_for(noise_multiplier: float, delta: float) -> float:
    """What one release of multiplier ``noise_multiplier`` costs at ``delta``."""
    return epsilon_of([Charge(noise_multiplier=noise_multiplier)], delta=delta)


def noise_std(layout: Layout, noise_multiplier: float) -> npt.NDArray[np.float64]:
    """The standard deviation of the noise the charge accounts on each released sum (in
    the sum's units): ``z * Delta * scale``. The total carries at least this much; more when
    silos add larger shares than the honest minimum (:func:`total_noise_std`)."""
    return noise_multiplier * layout.sensitivity * layout.scale_vector()


def total_noise_std(
    layout: Layout, noise_multiplier: float, *, silos: int, divisor: int
) -> npt.NDArray[np.float64]:
    """The noise standard deviation on each released sum when each of ``silos`` silos adds
    the share of ``divisor`` honest silos (sum units; ring rounding ignored)."""
    return noise_std(layout, noise_multiplier) * math.sqrt(silos / divisor)


def ring_sensitivity(layout: Layout, fixed: FixedPoint = FIXED_POINT) -> float:
    """The integer L2 sensitivity of the rounded ring vector (see the module docstring)."""
    return layout.sensitivity * fixed.scale + 2 * math.sqrt(layout.words)


def ring_share_sigma(
    layout: Layout, noise_multiplier: float, divisor: int, fixed: FixedPoint = FIXED_POINT
) -> float:
    """One silo's discrete-Gaussian parameter in ring units, relying on ``divisor`` honest
    shares."""
    if divisor < 1:
        raise ConfigError(f"a query needs at least one honest silo, got {divisor}")
    return noise_multiplier * ring_sensitivity(layout, fixed) / math.sqrt(divisor)


def share_variance(
    layout: Layout, noise_multiplier: float, divisor: int, fixed: FixedPoint = FIXED_POINT
) -> float:
    """The variance (ring units squared) of one silo's noise on each word, at most: its
    discrete Gaussian's ``sigma^2``."""
    return ring_share_sigma(layout, noise_multiplier, divisor, fixed) ** 2


def answer_noise_std(
    layout: Layout, variances: list[float], fixed: FixedPoint = FIXED_POINT
) -> npt.NDArray[np.float64]:
    """The noise standard deviation on each released sum (its units) when the silos added
    noise of ``variances`` (ring units squared, one per silo) to every word."""
    for variance in variances:
        if not (variance >= 0 and math.isfinite(variance)):
            raise ConfigError(f"a silo reported a noise variance of {variance}")
    return math.sqrt(math.fsum(variances)) / fixed.scale * layout.scale_vector()


def noisy_share(
    layout: Layout,
    scaled: npt.NDArray[np.float64],
    noise_multiplier: float,
    divisor: int,
    fixed: FixedPoint = FIXED_POINT,
) -> npt.NDArray[np.float64]:
    """This silo's scaled sums rounded to the ring's grid plus its discrete-Gaussian share,
    read back as values (each an exact grid point: the masking re-encodes it as is)."""
    sigma = ring_share_sigma(layout, noise_multiplier, divisor, fixed)
    check_sum_slack(sigma, divisor, layout.words)
    bound = fixed.clip * fixed.scale
    words = np.rint(np.clip(scaled * fixed.scale, -bound, bound)).astype(np.int64)
    words += discrete_gaussian(sigma, layout.words)
    return words.astype(np.float64) / fixed.scale
