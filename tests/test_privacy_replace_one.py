"""DP-SGD's epsilon against a brute-force replace-one computation.

The privacy unit is one record of a silo replaced by another. The independent check numerically
integrates the hockey-stick divergence between the outputs of the Poisson-subsampled Gaussian
for every pair of clipped contributions ``a``, ``b`` (``|a|, |b| <= C``) on a grid, in the plane
they span with the rest of the sum, and asserts that the charged epsilon keeps it within delta.
Positive control: the add/remove figure (Opacus', and fedcore's before issue 22's follow-up)
breaks the same check.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from fedcore.privacy import PrivacyAccountant, calibrate_noise_multiplier
from fedcore.privacy.accountant import Mechanism, epsilon_of_history
from fedcore.privacy.dpsgd import DPSGD, RELATION

_GRID = np.linspace(-8.0, 8.0, 401)
_X, _Y = np.meshgrid(_GRID, _GRID)
_AREA = float((_GRID[1] - _GRID[0]) ** 2)


def _gauss(z: float, centre: tuple[float, float]) -> npt.NDArray[np.float64]:
    r2 = (_X - centre[0]) ** 2 + (_Y - centre[1]) ** 2
    return np.exp(-r2 / (2 * z * z)) / (2 * math.pi * z * z)


def _worst_delta(z: float, q: float, epsilon: float) -> float:
    """max over contribution pairs (clip 1) of the hockey-stick divergence at ``epsilon``."""
    rest = _gauss(z, (0.0, 0.0))
    worst = 0.0
    for angle in np.linspace(0.0, math.pi, 5):
        for ra in (0.5, 1.0):
            for rb in (0.0, 0.5, 1.0):
                b = (rb * math.cos(angle), rb * math.sin(angle))
                p = (1 - q) * rest + q * _gauss(z, (ra, 0.0))
                r = (1 - q) * rest + q * _gauss(z, b)
                for one, other in ((p, r), (r, p)):
                    gap = np.maximum(one - math.exp(epsilon) * other, 0.0)
                    worst = max(worst, float(gap.sum()) * _AREA)
    return worst


_DELTA = 1e-2


_MECHANISMS: tuple[Mechanism, ...] = ("pld", "rdp", "best")


@pytest.mark.parametrize(("z", "q"), [(1.0, 1.0), (1.0, 0.2), (2.0, 0.5)])
def test_dpsgd_epsilon_bounds_every_replaced_record(z: float, q: float) -> None:
    for mechanism in _MECHANISMS:
        accountant = PrivacyAccountant(mechanism=mechanism, relation=RELATION)
        accountant.step(noise_multiplier=z, sample_rate=q)
        charged = accountant.get_epsilon(delta=_DELTA)
        assert _worst_delta(z, q, charged) <= _DELTA * (1 + 1e-3), mechanism
    # Positive control: the harness finds the add/remove figure that was charged too low.
    add_remove = epsilon_of_history([(z, q, 1)], delta=_DELTA)
    assert _worst_delta(z, q, add_remove) > _DELTA * 1.05


def test_the_silo_charges_replace_one() -> None:
    """The silo's accountant, not only the function, uses the relation (through ``DPSGD``)."""
    silo = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=_DELTA)
    silo.accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert _worst_delta(1.0, 1.0, silo.epsilon) <= _DELTA * (1 + 1e-3)
    assert silo.epsilon > 1.9 * epsilon_of_history([(1.0, 1.0, 1)], delta=_DELTA)


def test_replace_one_without_sampling_is_the_gaussian_of_twice_the_sensitivity() -> None:
    for mechanism in ("rdp", "pld"):
        replace = epsilon_of_history(
            [(3.0, 1.0, 7)], delta=1e-5, mechanism=mechanism, relation="replace-one"
        )
        assert replace == epsilon_of_history([(1.5, 1.0, 7)], delta=1e-5, mechanism=mechanism)


@pytest.mark.parametrize("q", [1.0, 0.05])
def test_calibration_uses_the_bound_it_is_charged_by(q: float) -> None:
    z = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sample_rate=q, steps=50, relation=RELATION
    )
    charged = epsilon_of_history([(z, q, 50)], delta=1e-5, relation=RELATION)
    assert 2.0 * 0.99 <= charged <= 2.0
    add_remove = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=q, steps=50)
    assert z > 1.2 * add_remove


def test_composition_bounds_the_replaced_pair_over_two_steps() -> None:
    """Two releases of the worst pair (+C against -C, q = 0.3), the joint output integrated on
    the plane: the charged epsilon still bounds it."""
    z, q = 1.0, 0.3
    line = _GRID
    step = float(line[1] - line[0])

    def mixture(sign: float) -> npt.NDArray[np.float64]:
        base = np.exp(-(line**2) / (2 * z * z))
        shifted = np.exp(-((line - sign) ** 2) / (2 * z * z))
        return ((1 - q) * base + q * shifted) / math.sqrt(2 * math.pi * z * z)

    p1, r1 = mixture(1.0), mixture(-1.0)
    p, r = np.outer(p1, p1), np.outer(r1, r1)
    charged = epsilon_of_history([(z, q, 2)], delta=_DELTA, relation=RELATION)
    gap = float(np.maximum(p - math.exp(charged) * r, 0.0).sum()) * step * step
    assert gap <= _DELTA * (1 + 1e-3)
    add_remove = epsilon_of_history([(z, q, 2)], delta=_DELTA)
    assert float(np.maximum(p - math.exp(add_remove) * r, 0.0).sum()) * step * step > _DELTA
