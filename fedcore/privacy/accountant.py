"""Privacy accounting through Google's ``dp-accounting`` library, never hand-written formulas.

A round of DP-FedAvg is a Poisson-subsampled Gaussian mechanism (McMahan et al., ICLR 2018):
every worker takes part with probability ``q`` (workers sampled per round / total workers) and
the sum of the clipped updates gets Gaussian noise of standard deviation ``z * C``. Rounds
compose; the accountant tracks the history of ``(z, q, steps)`` like Opacus' accountants do and
converts it to ``(epsilon, delta)`` with Rényi DP (Mironov, CSF 2017, with the conversion of
Canonne, Kamath and Steinke 2020 that ``dp-accounting`` applies) or with privacy loss
distributions (PLD; Koskela et al. 2020, Doroshenko et al. 2022).

Parameters are keyword-only so a noise multiplier and a sampling rate cannot be swapped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from fedcore.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting

# dp-accounting is imported where it is used, not here: it pulls in scipy (about a second per
# process), which coordinators and workers that run without differential privacy never need.

__all__ = [
    "Mechanism",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "gaussian_event",
]

Mechanism = Literal["rdp", "pld"]
_MECHANISMS: tuple[Mechanism, ...] = ("rdp", "pld")


def _check(noise_multiplier: float, sample_rate: float) -> None:
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ConfigError(
            f"the noise multiplier must be a positive number, got {noise_multiplier}; "
            "without noise there is no differential privacy"
        )
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"the sampling rate must be in (0, 1], got {sample_rate}")


def gaussian_event(
    *, noise_multiplier: float, sample_rate: float, steps: int = 1
) -> dp_accounting.DpEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    import dp_accounting

    _check(noise_multiplier, sample_rate)
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps) if steps != 1 else event


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp-accounting's per-order convergence notes while a search probes bad values."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fresh(mechanism: Mechanism) -> dp_accounting.PrivacyAccountant:
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if mechanism == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if mechanism == "pld":
        return pld_privacy_accountant.PLDAccountant()
    raise ConfigError(f"unknown accountant {mechanism!r}; choose one of {_MECHANISMS}")


class PrivacyAccountant:
    """Tracks the privacy spent by a sequence of subsampled Gaussian mechanisms.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` entries, merged when
    consecutive steps share their parameters, as in Opacus' ``RDPAccountant``.
    """

    def __init__(self, *, mechanism: Mechanism = "rdp") -> None:
        if mechanism not in _MECHANISMS:
            raise ConfigError(f"unknown accountant {mechanism!r}; choose one of {_MECHANISMS}")
        self.mechanism: Mechanism = mechanism
        self.history: list[tuple[float, float, int]] = []

    def __len__(self) -> int:
        """Steps accounted so far."""
        return sum(steps for _, _, steps in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases with these parameters."""
        _check(noise_multiplier, sample_rate)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if not history:
            return 0.0
        accountant = _fresh(self.mechanism)
        with _quiet_absl():
            for z, q, n in history:
                accountant.compose(gaussian_event(noise_multiplier=z, sample_rate=q, steps=n))
            return float(accountant.get_epsilon(delta))

    def get_epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return self._epsilon(self.history, delta)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1
    ) -> float:
        """Epsilon that would be spent after ``steps`` more releases (the history is unchanged)."""
        _check(noise_multiplier, sample_rate)
        extra = [(noise_multiplier, sample_rate, steps)]
        return self._epsilon([*self.history, *extra], delta)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-friendly checkpoint of the accountant."""
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint written by :meth:`state_dict`."""
        if state.get("mechanism") != self.mechanism:
            raise ConfigError(
                f"checkpoint was written by a {state.get('mechanism')!r} accountant, this one "
                f"is {self.mechanism!r}; create the accountant with the same mechanism"
            )
        history = [(float(z), float(q), int(n)) for z, q, n in state.get("history", [])]
        for z, q, n in history:
            _check(z, q)
            if n < 1:
                raise ConfigError("checkpoint history holds an entry with fewer than 1 step")
        self.history = history


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism = "rdp",
) -> float:
    """The smallest noise multiplier whose ``steps`` releases stay within ``target_epsilon``.

    Delegates the search to ``dp_accounting.calibrate_dp_mechanism`` (Brent's method).
    """
    if not target_epsilon > 0:
        raise ConfigError(f"the target epsilon must be positive, got {target_epsilon}")
    if steps < 1:
        raise ConfigError(f"calibration needs at least 1 round, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    _check(1.0, sample_rate)
    import dp_accounting

    try:
        with _quiet_absl():
            z = dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(mechanism),
                lambda z: gaussian_event(noise_multiplier=z, sample_rate=sample_rate, steps=steps),
                target_epsilon,
                delta,
                dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-4,
            )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
        raise ConfigError(
            f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} over "
            f"{steps} rounds; raise the target epsilon or run fewer rounds"
        ) from None
    # Brent's method stops within tol of the optimum, on either side: step up until it holds.
    z = float(z)
    accountant = PrivacyAccountant(mechanism=mechanism)
    while (
        accountant.epsilon_after(
            noise_multiplier=z, sample_rate=sample_rate, delta=delta, steps=steps
        )
        > target_epsilon
    ):
        z *= 1.0001
    return z
