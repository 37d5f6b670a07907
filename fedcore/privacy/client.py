"""The worker's side of client-level DP: clip (and, in distributed mode, noise) the update.

The coordinator asks for it in the plan (``TrainConfig.extra``), so every worker of a DP
federation applies the same rules whatever :class:`~fedcore.worker.Trainer` it runs. The
worker turns its trained weights into a delta from the received global weights, clips the
delta to L2 norm ``clip_norm`` — before secure aggregation, so clipping holds although the
coordinator never sees single updates — adds its share of the noise in distributed mode, and
reports a weight of 1: under DP every update counts the same (bounded weights), whatever the
silo's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .clipping import clip_update
from .noise import add_gaussian_noise, add_ring_noise, distributed_noise_std, secure_generator

__all__ = ["CLIENT_DP_KEYS", "ClientDP", "PrivatizedUpdate", "privatize_update"]

_CLIP, _BIT = "dp.clip_norm", "dp.report_unclipped"
# The round's noise multiplier z (noise std z * clip on the sum): stated so a worker's policy
# can check it and its privacy ledger account it (fedcore.policy).
_Z = "dp.noise_multiplier"
# Distributed mode: the fewest updates a released sum may hold. The worker derives its own
# noise share z * C / sqrt(m) from z, C and m; no plan field states the share itself, so a
# coordinator cannot lower it without lowering a number the worker checks and charges.
_MIN_UPDATES = "dp.min_updates"
CLIENT_DP_KEYS = (_CLIP, _BIT, _Z, _MIN_UPDATES)
#: Training metric carrying the adaptive-clipping bit (1.0: the update was not clipped).
UNCLIPPED_METRIC = "dp_unclipped"


@dataclass(frozen=True)
class ClientDP:
    """What a plan asks of a worker under client-level DP.

    ``min_updates`` None is central mode (the coordinator adds the noise); an integer m is
    distributed mode, where the worker adds its share itself (:attr:`noise_std`).

    ``honest_silos`` is never on the wire: a worker's gate sets it from its own policy
    (``[training] honest-silos``, default 1), and the share is then
    ``noise_multiplier * clip_norm / sqrt(min(m, honest_silos))``: a coordinator claiming a
    large ``m`` cannot thin it below what the silo accepts (issue 22). None is the plan's
    nominal share ``z C / sqrt(m)``, the coordinator's view when it accounts a round.

    ``ring_step``, also set by the gate only (from the secure round's fixed point): the value
    of one ring unit of this worker's masked input. With it the share is exact
    discrete-Gaussian noise on that grid (:func:`~.noise.add_ring_noise`).
    """

    clip_norm: float
    report_unclipped: bool = False  # adaptive clipping in central mode
    noise_multiplier: float | None = None  # the round's z, for the workers' policies
    min_updates: int | None = None  # distributed mode: the fewest updates in a released sum
    honest_silos: int | None = None  # the worker's policy: honest shares it relies on
    ring_step: float | None = None  # the secure round's grid: exact integer noise

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"the plan's clip norm must be positive, got {self.clip_norm}")
        z = self.noise_multiplier
        if z is not None and not (z >= 0 and math.isfinite(z)):
            raise ConfigError(f"the plan's noise multiplier must be finite and >= 0, got {z}")
        if self.min_updates is not None:
            if self.min_updates < 1:
                raise ConfigError(
                    f"the plan's minimum update count must be at least 1, got {self.min_updates}"
                )
            if z is None:
                raise ConfigError("distributed DP needs the plan's noise multiplier")
        if self.honest_silos is not None and self.honest_silos < 1:
            raise ConfigError(f"honest silos must be at least 1, got {self.honest_silos}")

    @property
    def distributed(self) -> bool:
        return self.min_updates is not None

    @property
    def noise_std(self) -> float:
        """This worker's noise share: derived here, never read from the plan."""
        if self.min_updates is None or self.noise_multiplier is None:
            return 0.0
        return distributed_noise_std(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            min_updates=self.shares,
        )

    @property
    def shares(self) -> int:
        """How many honest shares this worker's noise relies on (distributed mode)."""
        if self.min_updates is None:
            return 1
        if self.honest_silos is None:
            return self.min_updates
        return min(self.min_updates, self.honest_silos)

    def to_extra(self) -> dict[str, float]:
        extra = {_CLIP: self.clip_norm, _BIT: 1.0 if self.report_unclipped else 0.0}
        if self.noise_multiplier is not None:
            extra[_Z] = self.noise_multiplier
        if self.min_updates is not None:
            extra[_MIN_UPDATES] = float(self.min_updates)
        return extra

    @classmethod
    def from_extra(cls, extra: Mapping[str, float]) -> ClientDP | None:
        """The DP request in a plan, or None when the plan asks for none.

        Raises:
            ConfigError: a value is out of range (not finite, negative, a fractional count).
        """
        if _CLIP not in extra:
            return None
        min_updates = None
        if _MIN_UPDATES in extra:
            m = float(extra[_MIN_UPDATES])
            if not (math.isfinite(m) and m.is_integer()):
                raise ConfigError(
                    f"the plan's minimum update count must be a whole number, got {m}"
                )
            min_updates = int(m)
        return cls(
            clip_norm=float(extra[_CLIP]),
            report_unclipped=bool(extra.get(_BIT, 0.0)),
            noise_multiplier=float(extra[_Z]) if _Z in extra else None,
            min_updates=min_updates,
        )


@dataclass(frozen=True)
class PrivatizedUpdate:
    """A clipped (and maybe noised) delta, and the metrics it may reveal."""

    delta: Weights
    metrics: dict[str, float]


def privatize_update(
    received: Weights,
    updated: Weights,
    settings: ClientDP,
    *,
    is_delta: bool = False,
    rng: np.random.Generator | None = None,
) -> PrivatizedUpdate:
    """Delta from ``received``, clipped to ``settings.clip_norm``, plus the noise share."""
    if is_delta:
        delta = {k: np.asarray(v) for k, v in updated.items()}
    else:
        delta = {
            name: np.subtract(updated[name], base, dtype=np.float64).astype(base.dtype)
            if base.dtype.kind == "f"
            else np.zeros_like(base)
            for name, base in received.items()
        }
    clipped = clip_update(delta, settings.clip_norm)
    out = clipped.update
    z = settings.noise_multiplier
    if settings.distributed and settings.ring_step is not None and z:
        add_ring_noise(
            out,
            noise_multiplier=z,
            sensitivity=settings.clip_norm,
            shares=settings.shares,
            step=settings.ring_step,
        )
    else:
        add_gaussian_noise(out, settings.noise_std, rng if rng is not None else secure_generator())
    metrics = (
        {UNCLIPPED_METRIC: 0.0 if clipped.clipped else 1.0} if settings.report_unclipped else {}
    )
    return PrivatizedUpdate(out, metrics)
