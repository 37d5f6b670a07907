"""fed-audit (issue 22): the statistics against golden values, the adapters reaching the real
code, every honest mechanism below its claim and every positive control caught.

The audits run at the CI setting from fixed seeds (the harness's generators; DP-SGD's batch
sampling stays on the OS's CSPRNG, at sampling rate 1 it is deterministic anyway), so these
tests are not flaky; the run counts were chosen so that other seeds pass too (docs/audit.md).
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom, norm

from fedcore.audit import ScaledNoise, audit, clopper_pearson, epsilon_from_rates
from fedcore.audit.analytics import AnalyticsQuery, ExactMinCountRefusal
from fedcore.audit.cli import main
from fedcore.audit.dpsgd import DPSGDSilo
from fedcore.audit.fedavg import FedAvgRound
from fedcore.audit.runner import AuditResult
from fedcore.audit.stats import epsilon_lower_bound, strongest_bound, threshold_bound
from fedcore.audit.suite import DELTA, EPSILON, SUITE, entries

# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.308497),  # 1 - 0.025^(1/10)
        (5, 10, 0.187086, 0.812914),
        (0, 100, 0.0, 0.036217),
        (100, 100, 0.963783, 1.0),
        (3, 1000, 0.000619, 0.008742),
    ],
)
def test_clopper_pearson_golden_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo == pytest.approx(low, abs=1e-6)
    assert hi == pytest.approx(high, abs=1e-6)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_clopper_pearson_is_exact_at_its_ends(case: tuple[int, int]) -> None:
    """Each end is where the binomial tail holds 2.5%: the interval is exact, not approximate,
    and it holds the observed proportion."""
    k, n = case
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo <= k / n <= hi
    if k < n:
        assert float(binom.cdf(k, n, hi)) == pytest.approx(0.025, abs=1e-6)
    if k > 0:
        assert float(binom.sf(k - 1, n, lo)) == pytest.approx(0.025, abs=1e-6)


def test_clopper_pearson_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(11, 10, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 10, 1.0)


def test_epsilon_from_rates_both_directions() -> None:
    assert epsilon_from_rates(0.01, 0.5, 0.0) == pytest.approx(math.log(50))
    assert epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(math.log(50))  # the mirror
    assert epsilon_from_rates(0.01, 0.5, 0.1) == pytest.approx(math.log(40))
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0
    assert epsilon_from_rates(0.3, 0.95, 0.1) == 0.0  # 1 - delta - FNR < 0: no bound
    assert epsilon_from_rates(0.0, 0.5, 0.0) == math.inf


def test_threshold_bound_counts_errors_and_takes_upper_bounds() -> None:
    with_canary = np.array([0.0, 2.0, 3.0, 4.0])
    without = np.array([-1.0, 0.0, 1.0, 2.5])
    bound = threshold_bound(with_canary, without, 1.5, delta=0.0, confidence=0.95)
    assert (bound.false_positives, bound.false_negatives, bound.trials) == (1, 1, 4)
    assert bound.fpr_upper == pytest.approx(clopper_pearson(1, 4, 0.95)[1])
    assert bound.epsilon == epsilon_from_rates(bound.fpr_upper, bound.fnr_upper, 0.0)


def test_perfect_separation_reaches_the_strongest_bound_and_no_more() -> None:
    n = 400
    bound = epsilon_lower_bound(np.ones(n), np.zeros(n), delta=0.1)
    assert bound.evaluated.false_positives == bound.evaluated.false_negatives == 0
    assert bound.evaluated.epsilon == pytest.approx(
        strongest_bound(n // 2, delta=0.1, confidence=0.95)
    )
    zero_errors = 1 - 0.025 ** (1 / 200)  # Clopper-Pearson's upper end for 0 of 200
    assert bound.evaluated.epsilon == pytest.approx(math.log((0.9 - zero_errors) / zero_errors))
    # A refusal (-inf) on one side only is separated just as well.
    refusals = epsilon_lower_bound(np.ones(n), np.full(n, -np.inf), delta=0.1)
    assert refusals.evaluated.epsilon == pytest.approx(bound.evaluated.epsilon)


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of mu-GDP at delta (Dong, Roth and Su 2019), by bisection."""

    def profile(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if profile(mid) > delta else (lo, mid)
    return hi


def test_the_bound_stays_below_the_true_epsilon_of_a_gaussian() -> None:
    """Soundness: for a shift of 2 standard deviations the bound, over 20 seeds, never passes
    the exact epsilon (it would with 5% probability at most), and it is not vacuous either."""
    rng = np.random.default_rng(11)
    mu, delta = 2.0, 0.1
    exact = _gaussian_epsilon(mu, delta)
    bounds = [
        epsilon_lower_bound(rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000), delta=delta)
        for _ in range(20)
    ]
    values = [b.evaluated.epsilon for b in bounds]
    assert max(values) < exact
    assert min(values) > exact / 3
    # The chosen threshold's rates on the selection half are optimistic, as they should be.
    assert np.mean([b.selected.epsilon for b in bounds]) > np.mean(values)


def test_identical_outputs_give_no_bound_worth_speaking_of() -> None:
    rng = np.random.default_rng(5)
    bound = epsilon_lower_bound(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), delta=0.1)
    assert bound.evaluated.epsilon < 0.5


def test_scaled_noise_draws_the_asked_fraction_of_the_std() -> None:
    halved = ScaledNoise(np.random.PCG64(3), 0.5)
    assert float(np.std(halved.normal(0.0, 2.0, size=40_000))) == pytest.approx(1.0, rel=0.02)
    assert isinstance(halved, np.random.Generator)  # any mechanism that takes a generator


# ------------------------------------------------------------------ the adapters reach the code


def _scores(mechanism: FedAvgRound | AnalyticsQuery | DPSGDSilo, canary: bool) -> list[float]:
    rng = np.random.default_rng(0)
    return [mechanism.run(canary, rng) for _ in range(3)]


def test_fedavg_round_releases_the_canary_through_the_strategy() -> None:
    """With almost no noise the released sum along the canary's direction is C (clipped from
    10 C by the worker) with the canary and 0 with its zero update."""
    quiet = FedAvgRound(1.0, DELTA, clip_norm=2.0, noise_factor=1e-6)
    assert _scores(quiet, True) == pytest.approx([1.0] * 3, abs=1e-4)
    assert _scores(quiet, False) == pytest.approx([0.0] * 3, abs=1e-4)


def test_analytics_query_counts_the_canary_row_through_the_pipeline() -> None:
    """Replace-one: the canary (x = 10) is counted, the row in its place (x = -10) is not."""
    quiet = AnalyticsQuery("count() where x >= 0", 1.0, DELTA, noise_factor=1e-3)
    assert _scores(quiet, True) == pytest.approx([61.0] * 3, abs=0.05)  # 3 x 20 + the canary
    assert _scores(quiet, False) == pytest.approx([60.0] * 3, abs=0.05)
    total = AnalyticsQuery("sum(x)", 1.0, DELTA, noise_factor=1e-3, canary=7.5)
    # the sum's noise is 10x the count's (its values are bounded by 10)
    assert _scores(total, True) == pytest.approx([67.5] * 3, abs=0.5)
    assert _scores(total, False) == pytest.approx([50.0] * 3, abs=0.5)


def test_small_cells_are_answered_and_the_frozen_refusal_control_refuses() -> None:
    """The deployed pipeline answers a cell of 9 rows (with noise); the frozen pre-issue-22
    rule refuses it, for free, so the control reaches the refusal path."""
    deployed = AnalyticsQuery("count() where x >= 0", 1.0, DELTA, rows=[1.0] * 9, others=[1.0] * 20)
    assert all(s != -math.inf for s in _scores(deployed, False))
    frozen = AnalyticsQuery(
        "count() where x >= 0",
        1.0,
        DELTA,
        rows=[1.0] * 9,
        others=[1.0] * 20,
        admission=ExactMinCountRefusal(10),
    )
    assert all(s > 0 for s in _scores(frozen, True))  # 9 rows + the canary: answered
    assert _scores(frozen, False) == [-math.inf] * 3


def test_dpsgd_silo_trains_through_opacus_and_its_accountant() -> None:
    """One step on 5 records, clip 1, learning rate 1: the canary moves the weights by 1/5
    along its direction, its mirror image (the replaced record) by 1/5 the other way."""
    quiet = DPSGDSilo(1.0, DELTA, noise_factor=1e-4)
    assert _scores(quiet, True) == pytest.approx([0.2] * 3, abs=1e-3)
    assert _scores(quiet, False) == pytest.approx([-0.2] * 3, abs=1e-3)


# ------------------------------------------------------------------ the audit itself


@functools.cache
def _audited(name: str) -> AuditResult:
    (entry,) = entries((name,))
    assert entry.ci is not None
    return audit(name, entry.build(), runs=entry.ci, expect=entry.expect, seed=0)


_CI = [e.name for e in SUITE if e.ci is not None]
_HONEST = [e.name for e in SUITE if e.ci is not None and e.expect == "private"]
_CONTROLS = [e.name for e in SUITE if e.ci is not None and e.expect == "leaky"]


@pytest.mark.parametrize("name", _HONEST)
@pytest.mark.slow
def test_honest_mechanisms_stay_below_their_claim(name: str) -> None:
    result = _audited(name)
    assert result.claim.epsilon == pytest.approx(EPSILON, rel=1e-3)
    assert result.claim.delta == DELTA
    assert not result.violated, (result.lower_bound, result.claim)


@pytest.mark.parametrize("name", _CONTROLS)
@pytest.mark.slow
def test_positive_controls_are_caught(name: str) -> None:
    result = _audited(name)
    assert result.violated, (result.lower_bound, result.claim)
    assert result.verdict == "caught"


@pytest.mark.slow
def test_the_free_refusal_is_caught_far_above_the_claim() -> None:
    result = _audited("analytics-free-refusal")
    assert result.test.false_positives == result.test.false_negatives == 0
    assert result.lower_bound > EPSILON + 0.5


@pytest.mark.slow
def test_every_honest_ci_audit_but_the_smoke_can_find_a_violation() -> None:
    """A run count too small to ever show a bound above the claim would pass anything; only
    the DP-SGD smoke is that small in CI, and says so."""
    for name in _CI:
        result = _audited(name)
        assert result.conclusive == (name != "dpsgd"), name
    assert _audited("dpsgd").verdict == "too few runs"


# ------------------------------------------------------------------ fed-audit


def test_cli_prints_the_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "analytics-free-refusal", "--runs", "300", "--seed", "3"]) == 0
    table = capsys.readouterr().out
    assert "lower bound (95%)" in table
    assert "analytics-free-refusal" in table
    assert "caught" in table
    assert "--seed 3" in table
    assert main(["--only", "analytics-free-refusal", "--runs", "300", "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 3
    (row,) = report["results"]
    assert row["verdict"] == "caught"
    assert row["ok"] is True
    assert row["claimed_epsilon"] == pytest.approx(EPSILON, rel=1e-3)
    assert row["delta"] == DELTA


def test_cli_exit_status_is_1_when_a_control_is_missed(capsys: pytest.CaptureFixture[str]) -> None:
    """Ten runs cannot catch anything: the control is not caught and the audit fails."""
    assert main(["--only", "analytics-free-refusal", "--runs", "10", "--seed", "1"]) == 1
    assert "too few runs" in capsys.readouterr().out


def test_cli_lists_and_refuses_unknown_mechanisms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(e.name in listed for e in SUITE)
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "no-such-mechanism"])
    assert exit_info.value.code == 2
    assert "no audited mechanism no-such-mechanism" in capsys.readouterr().err
