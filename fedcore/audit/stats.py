"""From distinguishing-test outcomes to a lower bound on epsilon, with confidence.

An ``(epsilon, delta)``-DP mechanism bounds every test that guesses "the canary is in" from
its output: with false positive rate FPR and false negative rate FNR on neighbouring inputs,

    1 - FNR <= e^epsilon FPR + delta      and      1 - FPR <= e^epsilon FNR + delta

(Kairouz, Oh and Viswanath 2015). Measured rates turn these around into a lower bound,
``epsilon >= log((1 - delta - FNR) / FPR)`` and its mirror; with Clopper-Pearson upper bounds
on both rates the bound holds with the stated confidence (Jagielski, Ullman and Oprea 2020;
Nasr, Song, Thakurta, Papernot and Carlini 2021).

The test is a threshold on a score. The threshold is chosen on one half of the runs and the
bound computed on the other: taking the best of many thresholds on the same runs would be a
multiple comparison, and its "95%" would be optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import beta

__all__ = [
    "RateBound",
    "Threshold",
    "clopper_pearson",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "strongest_bound",
    "threshold_bound",
]

Scores = npt.NDArray[np.float64]


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The exact two-sided ``confidence`` interval of a binomial proportion.

    Raises:
        ValueError: counts out of range, or a confidence outside (0, 1).
    """
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"the confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = (
        1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    )
    return low, high


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The largest epsilon a test with these error rates proves at ``delta`` (0 if none).

    Both directions of the definition: ``log((1 - delta - FNR) / FPR)`` and
    ``log((1 - delta - FPR) / FNR)``; pass upper confidence bounds of the rates for a bound
    that holds with confidence.
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        numerator = 1 - delta - b
        if numerator <= 0:
            continue
        best = max(best, math.inf if a <= 0 else math.log(numerator / a))
    return best


def strongest_bound(trials: int, *, delta: float, confidence: float) -> float:
    """The largest bound ``trials`` runs a side can give (a test that never errs): an audit
    whose claim is above it cannot find a violation, whatever the mechanism does."""
    zero_errors = clopper_pearson(0, trials, confidence)[1]
    return epsilon_from_rates(zero_errors, zero_errors, delta)


@dataclass(frozen=True)
class RateBound:
    """One test's counts and the bound they give."""

    threshold: float
    false_positives: int
    false_negatives: int
    trials: int  # runs on each side
    fpr_upper: float
    fnr_upper: float
    epsilon: float


def threshold_bound(
    with_canary: Scores,
    without_canary: Scores,
    threshold: float,
    *,
    delta: float,
    confidence: float,
) -> RateBound:
    """The bound of the test "the canary is in when the score exceeds ``threshold``".

    Each rate gets a one-sided Clopper-Pearson bound at ``1 - (1 - confidence) / 2`` (the two
    hold together with probability ``confidence``, by the union bound).
    """
    n = len(with_canary)
    if n != len(without_canary) or n == 0:
        raise ValueError("need the same positive number of runs with and without the canary")
    fp = int(np.count_nonzero(without_canary > threshold))
    fn = int(np.count_nonzero(with_canary <= threshold))
    # The upper end of a two-sided interval at c is a one-sided bound at 1 - (1 - c) / 2.
    fpr_hi = clopper_pearson(fp, n, confidence)[1]
    fnr_hi = clopper_pearson(fn, n, confidence)[1]
    return RateBound(
        threshold, fp, fn, n, fpr_hi, fnr_hi, epsilon_from_rates(fpr_hi, fnr_hi, delta)
    )


@dataclass(frozen=True)
class Threshold:
    """The test chosen on the selection half and its bound on the evaluation half."""

    selected: RateBound  # on the runs the threshold was chosen from (optimistic)
    evaluated: RateBound  # on fresh runs: the reported lower bound


def _upper(errors: npt.NDArray[np.int64], trials: int, confidence: float) -> Scores:
    """Vectorised upper ends of :func:`clopper_pearson` (one-sided at ``1 - (1 - c) / 2``)."""
    tail = (1 - confidence) / 2
    high = beta.ppf(1 - tail, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, high).astype(np.float64)


def _candidates(with_canary: Scores, without_canary: Scores, limit: int) -> Scores:
    pooled = np.unique(np.concatenate([with_canary, without_canary]))
    pooled = pooled[np.isfinite(pooled)]
    if len(pooled) > limit:
        pooled = np.unique(np.quantile(pooled, np.linspace(0, 1, limit)))
    # -inf as well: a score that is -inf on refusals is separated by any finite threshold.
    return np.concatenate([pooled, [-math.inf]]) if len(pooled) else np.array([0.0])


def epsilon_lower_bound(
    with_canary: Scores,
    without_canary: Scores,
    *,
    delta: float,
    confidence: float = 0.95,
    candidates: int = 400,
) -> Threshold:
    """A lower bound on epsilon at ``delta`` that holds with probability ``confidence``.

    ``with_canary[i]`` and ``without_canary[i]`` are the scores of independent runs on the
    neighbouring inputs (larger: more canary-like). The first half of each chooses the
    threshold whose bound is largest, the second half bounds it.
    """
    n = min(len(with_canary), len(without_canary))
    if n < 2:
        raise ValueError(f"an audit needs at least 2 runs on each side, got {n}")
    half = n // 2
    pick_in, eval_in = with_canary[:half], with_canary[half : 2 * half]
    pick_out, eval_out = without_canary[:half], without_canary[half : 2 * half]
    thresholds = _candidates(pick_in, pick_out, candidates)
    fp = half - np.searchsorted(np.sort(pick_out), thresholds, side="right")
    fn = np.searchsorted(np.sort(pick_in), thresholds, side="right")
    fpr_hi = _upper(fp, half, confidence)
    fnr_hi = _upper(fn, half, confidence)
    scores = [epsilon_from_rates(a, b, delta) for a, b in zip(fpr_hi, fnr_hi, strict=True)]
    i = int(np.argmax(scores))
    best = RateBound(
        float(thresholds[i]),
        int(fp[i]),
        int(fn[i]),
        half,
        float(fpr_hi[i]),
        float(fnr_hi[i]),
        scores[i],
    )
    evaluated = threshold_bound(
        eval_in, eval_out, best.threshold, delta=delta, confidence=confidence
    )
    return Threshold(best, evaluated)
