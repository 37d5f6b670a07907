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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .clipping import clip_update
from .noise import add_gaussian_noise, secure_generator

__all__ = ["CLIENT_DP_KEYS", "ClientDP", "PrivatizedUpdate", "privatize_update"]

_CLIP, _NOISE, _BIT = "dp.clip_norm", "dp.noise_std", "dp.report_unclipped"
# The round's noise multiplier z (noise std z * clip on the sum): stated so a worker's policy
# can check it and its privacy ledger account it (fedcore.policy).
_Z = "dp.noise_multiplier"
CLIENT_DP_KEYS = (_CLIP, _NOISE, _BIT, _Z)
#: Training metric carrying the adaptive-clipping bit (1.0: the update was not clipped).
UNCLIPPED_METRIC = "dp_unclipped"


@dataclass(frozen=True)
class ClientDP:
    """What a plan asks of a worker under client-level DP."""

    clip_norm: float
    noise_std: float = 0.0  # this worker's noise share (distributed mode), else 0
    report_unclipped: bool = False  # adaptive clipping in central mode
    noise_multiplier: float | None = None  # the round's z, for the workers' policies

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"the plan's clip norm must be positive, got {self.clip_norm}")
        if self.noise_std < 0:
            raise ConfigError(f"the plan's noise share must be >= 0, got {self.noise_std}")

    def to_extra(self) -> dict[str, float]:
        extra = {
            _CLIP: self.clip_norm,
            _NOISE: self.noise_std,
            _BIT: 1.0 if self.report_unclipped else 0.0,
        }
        if self.noise_multiplier is not None:
            extra[_Z] = self.noise_multiplier
        return extra

    @classmethod
    def from_extra(cls, extra: Mapping[str, float]) -> ClientDP | None:
        """The DP request in a plan, or None when the plan asks for none."""
        if _CLIP not in extra:
            return None
        return cls(
            clip_norm=float(extra[_CLIP]),
            noise_std=float(extra.get(_NOISE, 0.0)),
            report_unclipped=bool(extra.get(_BIT, 0.0)),
            noise_multiplier=float(extra[_Z]) if _Z in extra else None,
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
    add_gaussian_noise(out, settings.noise_std, rng if rng is not None else secure_generator())
    metrics = (
        {UNCLIPPED_METRIC: 0.0 if clipped.clipped else 1.0} if settings.report_unclipped else {}
    )
    return PrivatizedUpdate(out, metrics)
