"""The discrete Gaussian of analytics noise (issue 22, item 7): its distribution, its privacy
as OpenDP states it against what the ledger charges, and the bound on sums of shares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcore.errors import ConfigError
from fedcore.privacy.discrete import (
    SUM_SLACK_LIMIT,
    check_sum_slack,
    discrete_gaussian,
    sum_slack,
)


def test_draws_follow_the_discrete_gaussians_mass_function() -> None:
    """40,000 draws: long enough to be drawn in chunks by several threads where there are
    cores for them; the union follows the mass function and no chunk repeats another."""
    sigma = 2.0
    draws = discrete_gaussian(sigma, 40_000)
    assert draws.dtype == np.int64
    assert draws.shape == (40_000,)
    assert not np.array_equal(draws[:20_000], draws[20_000:])
    support = np.arange(-12, 13)
    mass = np.exp(-(support**2) / (2 * sigma**2))
    mass /= mass.sum()
    observed = np.array([(draws == k).sum() for k in support]) / draws.size
    # Each frequency within 5 binomial standard deviations of its mass.
    tolerance = 5 * np.sqrt(mass * (1 - mass) / draws.size) + 1e-4
    assert (np.abs(observed - mass) < tolerance).all()
    assert abs(float(draws.mean())) < 5 * sigma / math.sqrt(draws.size)


def test_large_scales_keep_their_standard_deviation_and_are_never_repeated() -> None:
    sigma = 4.0e7  # a query's share in ring units
    first = discrete_gaussian(sigma, 10_000)
    assert float(first.std()) == pytest.approx(sigma, rel=0.03)
    assert not np.array_equal(first[:100], discrete_gaussian(sigma, 100))  # nothing seeded


def test_the_ledgers_gaussian_charge_is_what_opendp_proves_of_its_sampler() -> None:
    """OpenDP states the discrete Gaussian's zero-concentrated DP: rho = (Delta/sigma)^2 / 2,
    the Rényi curve of the continuous Gaussian of multiplier sigma / Delta (CKS20)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    sigma, delta_l2 = 30.0, 3
    measurement = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int), scale=sigma
    )
    rho = measurement.map(delta_l2)  # type: ignore[no-untyped-call]  # opendp: unannotated
    z = sigma / delta_l2
    assert rho == pytest.approx(1 / (2 * z**2), rel=1e-9)


def test_sums_of_shares_are_accounted_only_when_their_slack_is_negligible() -> None:
    assert sum_slack(1e5, 10, 10_000) == 0.0  # fedcore's scales: it underflows
    check_sum_slack(1e5, 10, 10_000)
    assert sum_slack(0.3, 3, 100) > SUM_SLACK_LIMIT  # tiny shares: far from one Gaussian
    with pytest.raises(ConfigError, match="discrete-Gaussian shares"):
        check_sum_slack(0.3, 3, 100)
    assert sum_slack(0.3, 1, 100) == 0.0  # one share is a discrete Gaussian exactly


def test_bad_scales_are_refused() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan, 2.0**60):
        with pytest.raises(ConfigError):
            discrete_gaussian(bad, 3)
