"""Privacy accounting through Google's ``dp-accounting`` library, never hand-written formulas.

A round of DP-FedAvg is a Poisson-subsampled Gaussian mechanism (McMahan et al., ICLR 2018):
every worker takes part with probability ``q`` (workers sampled per round / total workers) and
the sum of the clipped updates gets Gaussian noise of standard deviation ``z * C``. Rounds
compose; the accountant tracks the history of ``(z, q, steps)`` like Opacus' accountants do and
converts it to ``(epsilon, delta)`` with Rényi DP (Mironov, CSF 2017, with the conversion of
Canonne, Kamath and Steinke 2020 that ``dp-accounting`` applies) or with privacy loss
distributions (PLD; Koskela et al. 2020, Doroshenko et al. 2022). Both are upper bounds;
``"best"`` (the default) computes both and reports the smaller, which is as valid as either.

Without sampling (``q = 1``) the PLD figure is exact, not a discretised estimate: Gaussian
mechanisms compose exactly into one Gaussian mechanism whose multiplier is
``(sum of steps / z^2)^(-1/2)`` (Dong, Roth and Su 2022, Corollary 3.3), and the epsilon of one
Gaussian mechanism is computed exactly by ``dp_accounting.gaussian_mechanism`` (Balle and Wang,
ICML 2018). RDP over-states it (39.83 against 37.60 for ``z = 1``, 30 rounds, delta 1e-5).

Neighbouring relation. DP-FedAvg's unit is a worker added or removed (``"add-remove"``).
DP-SGD's unit is one record of one silo *replaced* (``"replace-one"``): silo sizes are public,
so only neighbours of the same size are meaningful, and a replaced record moves the clipped
sum by up to ``2 C``, not ``C``. Under replace-one, PLD is dp-accounting's
``NeighboringRelation.REPLACE_ONE`` analysis of the Poisson-subsampled Gaussian (the pair
``(1-q) N(0) + q N(+-C)``, which a brute-force search over record pairs confirms is the worst
case); RDP, which dp-accounting does not offer for that relation, is the add/remove curve taken
through the remove-then-add path with Mironov's weak triangle inequality (CSF 2017, Prop. 11:
``D_a(P||R) <= (a - 1/2)/(a - 1) D_2a(P||Q) + D_(2a-1)(Q||R)``). Without sampling both are
the Gaussian mechanism of sensitivity ``2 C``, i.e. of half the multiplier, exactly.

Parameters are keyword-only so a noise multiplier and a sampling rate cannot be swapped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from fedcore.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting

# dp-accounting is imported where it is used, not here: it pulls in scipy (about a second per
# process), which coordinators and workers that run without differential privacy never need.

__all__ = [
    "Mechanism",
    "PrivacyAccountant",
    "Relation",
    "calibrate_noise_multiplier",
    "epsilon_of_history",
    "gaussian_event",
    "rdp_epsilon_mixed",
]

Mechanism = Literal["rdp", "pld", "best"]
_MECHANISMS: tuple[Mechanism, ...] = ("rdp", "pld", "best")

#: The neighbouring relation an epsilon is stated for (see the module docstring).
Relation = Literal["add-remove", "replace-one"]
_RELATIONS: tuple[Relation, ...] = ("add-remove", "replace-one")

# Orders at which the replace-one RDP bound is evaluated: each needs the add/remove curve at
# 2a and 2a - 1.
_TRIANGLE_ORDERS = (
    1.1,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    128.0,
)

#: ``(noise_multiplier, sample_rate, steps)`` entries, oldest first.
History = Sequence[tuple[float, float, int]]

_PLD_GRID = 1e-3

# brentq stops within 1e-12 of the root, on either side; the slack keeps the exact figure an
# upper bound.
_ROOT_SLACK = 1e-9


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


def _fresh(
    mechanism: Literal["rdp", "pld"], relation: Relation = "add-remove"
) -> dp_accounting.PrivacyAccountant:
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if mechanism == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    neighbours = (
        NeighboringRelation.REPLACE_ONE
        if relation == "replace-one"
        else NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    # Pessimistic rounding keeps the PLD figure an upper bound at any grid; 1e-3 (not the
    # library's 1e-4) is ten times faster and moves epsilon by under 1e-3 at fedcore's settings.
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=neighbours, value_discretization_interval=_PLD_GRID
    )


def _composed(accountant: dp_accounting.PrivacyAccountant, history: History, delta: float) -> float:
    with _quiet_absl():
        for z, q, n in history:
            accountant.compose(gaussian_event(noise_multiplier=z, sample_rate=q, steps=n))
        return float(accountant.get_epsilon(delta))


def _exact_gaussian(history: History, delta: float) -> float:
    """The exact epsilon of Gaussian mechanisms without sampling, composed (see the module
    docstring)."""
    from dp_accounting import gaussian_mechanism

    sigma = math.fsum(n / z**2 for z, _, n in history) ** -0.5
    epsilon = float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta))
    return epsilon + _ROOT_SLACK * (1.0 + epsilon)


def _halved(history: History) -> list[tuple[float, float, int]]:
    """Without sampling, replace-one is add/remove at sensitivity ``2 C``: half the multiplier."""
    return [(z / 2, q, n) for z, q, n in history]


def _unsampled(history: History) -> bool:
    return all(q == 1 for _, q, _ in history)


def _pld(history: History, delta: float, relation: Relation) -> float:
    if _unsampled(history):
        return _exact_gaussian(_halved(history) if relation == "replace-one" else history, delta)
    return _composed(_fresh("pld", relation), history, delta)


def _triangle_curve(history: History) -> npt.NDArray[np.float64]:
    """The replace-one RDP of ``history`` at :data:`_TRIANGLE_ORDERS`, through the weak
    triangle inequality (module docstring)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    alphas = np.array(_TRIANGLE_ORDERS)
    orders = np.concatenate([2 * alphas, 2 * alphas - 1])
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
    with _quiet_absl():
        for z, q, n in history:
            accountant.compose(gaussian_event(noise_multiplier=z, sample_rate=q, steps=n))
    rdp = np.asarray(accountant.rdp, dtype=np.float64)
    count = len(alphas)
    doubled, doubled_less_one = rdp[:count], rdp[count:]
    curve: npt.NDArray[np.float64] = (alphas - 0.5) / (alphas - 1) * doubled + doubled_less_one
    return curve


def _rdp_replace_one(history: History, delta: float) -> float:
    """The replace-one RDP bound through the weak triangle inequality (module docstring)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    curve = _triangle_curve(history)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(np.array(_TRIANGLE_ORDERS), curve, delta)
    return float(epsilon)


def rdp_epsilon_mixed(*, add_remove: History, replace_one: History, delta: float) -> float:
    """Rényi-DP epsilon at ``delta`` of releases stated for add/remove neighbours composed
    with releases whose unit is a record replaced (a ledger holding both), at the orders of
    the replace-one bound; without replace-one releases, exactly :func:`epsilon_of_history`
    by ``"rdp"``."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if not replace_one:
        return epsilon_of_history(add_remove, delta=delta, mechanism="rdp") if add_remove else 0.0
    from dp_accounting.rdp import rdp_privacy_accountant

    alphas = np.array(_TRIANGLE_ORDERS)
    unsampled = [entry for entry in replace_one if entry[1] == 1]
    sampled = [entry for entry in replace_one if entry[1] < 1]
    plain = rdp_privacy_accountant.RdpAccountant(orders=list(alphas))
    with _quiet_absl():
        for z, q, n in [*add_remove, *_halved(unsampled)]:
            plain.compose(gaussian_event(noise_multiplier=z, sample_rate=q, steps=n))
    total = np.asarray(plain.rdp, dtype=np.float64)
    if sampled:
        total = total + _triangle_curve(sampled)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(alphas, total, delta)
    return float(epsilon)


def _rdp(history: History, delta: float, relation: Relation) -> float:
    if relation == "add-remove":
        return _composed(_fresh("rdp"), history, delta)
    if _unsampled(history):
        return _composed(_fresh("rdp"), _halved(history), delta)
    return _rdp_replace_one(history, delta)


def epsilon_of_history(
    history: History,
    *,
    delta: float,
    mechanism: Mechanism = "best",
    relation: Relation = "add-remove",
) -> float:
    """Epsilon at ``delta`` of ``history`` composed, by ``mechanism``, for neighbours under
    ``relation`` (0 for no history)."""
    if mechanism not in _MECHANISMS:
        raise ConfigError(f"unknown accountant {mechanism!r}; choose one of {_MECHANISMS}")
    if relation not in _RELATIONS:
        raise ConfigError(f"unknown neighbouring relation {relation!r}; choose one of {_RELATIONS}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    for z, q, n in history:
        _check(z, q)
        if n < 1:
            raise ValueError(f"steps must be at least 1, got {n}")
    if not history:
        return 0.0
    if mechanism == "rdp":
        return _rdp(history, delta, relation)
    if mechanism == "pld":
        return _pld(history, delta, relation)
    return min(_rdp(history, delta, relation), _pld(history, delta, relation))


class PrivacyAccountant:
    """Tracks the privacy spent by a sequence of subsampled Gaussian mechanisms.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` entries, merged when
    consecutive steps share their parameters, as in Opacus' ``RDPAccountant``.
    ``mechanism`` picks the analysis: ``"rdp"``, ``"pld"`` or ``"best"`` (the smaller of the two);
    ``relation`` the neighbours the epsilon is stated for (see the module docstring).
    """

    def __init__(self, *, mechanism: Mechanism = "best", relation: Relation = "add-remove") -> None:
        if mechanism not in _MECHANISMS:
            raise ConfigError(f"unknown accountant {mechanism!r}; choose one of {_MECHANISMS}")
        if relation not in _RELATIONS:
            raise ConfigError(
                f"unknown neighbouring relation {relation!r}; choose one of {_RELATIONS}"
            )
        self.mechanism: Mechanism = mechanism
        self.relation: Relation = relation
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

    def _epsilon(self, history: History, delta: float) -> float:
        return epsilon_of_history(
            history, delta=delta, mechanism=self.mechanism, relation=self.relation
        )

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
        """Restore a checkpoint written by :meth:`state_dict`.

        The history is what was released; the mechanism only analyses it, so a history
        written under another (valid) mechanism is restored and analysed by this one.
        """
        if state.get("mechanism") not in _MECHANISMS:
            raise ConfigError(
                f"checkpoint was written by an unknown accountant {state.get('mechanism')!r}; "
                f"expected one of {_MECHANISMS}"
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
    mechanism: Mechanism = "best",
    relation: Relation = "add-remove",
) -> float:
    """The smallest noise multiplier whose ``steps`` releases stay within ``target_epsilon``
    for neighbours under ``relation`` (the bound the accountant then charges).

    Without sampling, ``"pld"`` and ``"best"`` invert the exact Gaussian curve
    (``dp_accounting.gaussian_mechanism.get_sigma_gaussian``); otherwise the search is
    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method) by RDP, which ``"pld"`` and
    ``"best"`` then lower by bisection down to 70% of it (PLD is tighter for Gaussian noise,
    but its grid explodes at tiny multipliers, so it never drives the search from below).
    """
    if not target_epsilon > 0:
        raise ConfigError(f"the target epsilon must be positive, got {target_epsilon}")
    if steps < 1:
        raise ConfigError(f"calibration needs at least 1 round, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if mechanism not in _MECHANISMS:
        raise ConfigError(f"unknown accountant {mechanism!r}; choose one of {_MECHANISMS}")
    if relation not in _RELATIONS:
        raise ConfigError(f"unknown neighbouring relation {relation!r}; choose one of {_RELATIONS}")
    _check(1.0, sample_rate)
    if relation == "replace-one":
        return _replace_one_multiplier(target_epsilon, delta, sample_rate, steps, mechanism)
    return _add_remove_multiplier(target_epsilon, delta, sample_rate, steps, mechanism)


def _add_remove_multiplier(
    target: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism
) -> float:
    import dp_accounting

    if sample_rate == 1 and mechanism != "rdp":
        from dp_accounting import gaussian_mechanism

        sigma = float(gaussian_mechanism.get_sigma_gaussian(target, delta))
        return _stepped_up(sigma * math.sqrt(steps), target, delta, 1.0, steps, mechanism)
    try:
        with _quiet_absl():
            z = dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh("rdp"),
                lambda z: gaussian_event(noise_multiplier=z, sample_rate=sample_rate, steps=steps),
                target,
                delta,
                dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-4,
            )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError:
        raise ConfigError(
            f"no noise multiplier reaches epsilon {target:g} at delta {delta:g} over "
            f"{steps} rounds; raise the target epsilon or run fewer rounds"
        ) from None
    z = _stepped_up(float(z), target, delta, sample_rate, steps, "rdp")
    if mechanism == "rdp":
        return z
    return _lowered(z, target, delta, sample_rate, steps, mechanism)


def _replace_one_multiplier(
    target: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism
) -> float:
    """Replace-one neighbours are never easier than add/remove ones, so the add/remove
    multiplier is a floor; without sampling the answer is exactly twice it."""
    floor = _add_remove_multiplier(target, delta, sample_rate, steps, mechanism)
    if sample_rate == 1:
        return _stepped_up(2 * floor, target, delta, 1.0, steps, mechanism, "replace-one")

    def fits(candidate: float) -> bool:
        history = [(candidate, sample_rate, steps)]
        epsilon = epsilon_of_history(
            history, delta=delta, mechanism=mechanism, relation="replace-one"
        )
        return epsilon <= target

    low, high = floor, 2 * floor
    while not fits(high):
        low, high = high, 2 * high
    while high - low > 1e-3 * low:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _lowered(
    z: float, target: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism
) -> float:
    """The smallest multiplier in [0.7 z, z] (to 0.1%) that ``mechanism`` keeps within
    ``target``; ``z`` must already keep within it."""

    def fits(candidate: float) -> bool:
        history = [(candidate, sample_rate, steps)]
        return epsilon_of_history(history, delta=delta, mechanism=mechanism) <= target

    low, high = 0.7 * z, z
    if fits(low):
        return low
    while high - low > 1e-3 * z:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _stepped_up(
    z: float,
    target: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism,
    relation: Relation = "add-remove",
) -> float:
    """``z``, raised by 0.01% steps until ``steps`` releases stay within ``target`` (a search
    stops within its tolerance of the optimum, on either side)."""
    history = [(z, sample_rate, steps)]
    while epsilon_of_history(history, delta=delta, mechanism=mechanism, relation=relation) > target:
        z *= 1.0001
        history = [(z, sample_rate, steps)]
    return z
