"""Run a mechanism many times on neighbouring inputs and judge its claim.

``audit`` draws ``runs`` outputs with the canary and ``runs`` without, from two independent
generator streams spawned from one seed (``None``: fresh entropy from the OS), and turns the
scores into a lower bound on epsilon (:func:`~.stats.epsilon_lower_bound`). A mechanism
*violates* its claim when the lower bound, which holds with the stated confidence, is above
the epsilon it reports.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .mechanism import AuditedMechanism, Claim
from .stats import RateBound, epsilon_lower_bound, strongest_bound

__all__ = ["AuditResult", "Expect", "audit"]

#: ``private``: an honest mechanism, whose bound must stay below its claim. ``leaky``: a
#: positive control, a broken build the audit must catch (bound above the claim).
Expect = Literal["private", "leaky"]


@dataclass(frozen=True)
class AuditResult:
    """One mechanism's audit."""

    name: str
    description: str
    expect: Expect
    claim: Claim
    runs: int  # on each side
    lower_bound: float
    confidence: float
    test: RateBound  # the chosen threshold's counts on the evaluation half
    seconds: float
    seed: int | None

    @property
    def conclusive(self) -> bool:
        """Whether these runs could show a bound above the claim at all."""
        strongest = strongest_bound(
            self.test.trials, delta=self.claim.delta, confidence=self.confidence
        )
        return strongest > self.claim.epsilon

    @property
    def violated(self) -> bool:
        """The lower bound is above the claimed epsilon."""
        return self.lower_bound > self.claim.epsilon

    @property
    def ok(self) -> bool:
        """An honest mechanism was not caught, or a positive control was."""
        return self.violated == (self.expect == "leaky")

    @property
    def verdict(self) -> str:
        if not self.violated and not self.conclusive:
            return "too few runs"
        if self.expect == "private":
            return "VIOLATED" if self.violated else "pass"
        return "caught" if self.violated else "MISSED"

    def to_json(self) -> dict[str, object]:
        return {
            "mechanism": self.name,
            "description": self.description,
            "expect": self.expect,
            "claimed_epsilon": self.claim.epsilon,
            "delta": self.claim.delta,
            "lower_bound": self.lower_bound,
            "confidence": self.confidence,
            "runs": self.runs,
            "threshold": self.test.threshold,
            "false_positives": self.test.false_positives,
            "false_negatives": self.test.false_negatives,
            "evaluation_runs": self.test.trials,
            "conclusive": self.conclusive,
            "verdict": self.verdict,
            "ok": self.ok,
            "seconds": self.seconds,
            "seed": self.seed,
        }


def audit(
    name: str,
    mechanism: AuditedMechanism,
    *,
    runs: int,
    expect: Expect = "private",
    seed: int | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit ``mechanism`` with ``runs`` runs on each of the neighbouring inputs.

    With a ``seed``, each mechanism's streams derive from the seed and its ``name``, so two
    mechanisms of one audit never share noise.
    """
    if runs < 2:
        raise ValueError(f"an audit needs at least 2 runs on each side, got {runs}")
    started = time.perf_counter()
    claim = mechanism.claim
    with_stream, without_stream = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence(
            None if seed is None else [seed, zlib.crc32(name.encode())]
        ).spawn(2)
    )
    with_canary = np.array([mechanism.run(True, with_stream) for _ in range(runs)])
    without_canary = np.array([mechanism.run(False, without_stream) for _ in range(runs)])
    bound = epsilon_lower_bound(
        with_canary, without_canary, delta=claim.delta, confidence=confidence
    )
    return AuditResult(
        name=name,
        description=mechanism.description,
        expect=expect,
        claim=claim,
        runs=runs,
        lower_bound=bound.evaluated.epsilon,
        confidence=confidence,
        test=bound.evaluated,
        seconds=time.perf_counter() - started,
        seed=seed,
    )
