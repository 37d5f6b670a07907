"""L2 clipping of model updates and adaptive clip norms.

Clipping bounds each worker's influence on the sum of updates — the sensitivity that the
Gaussian noise of DP-FedAvg is calibrated to (McMahan et al., ICLR 2018). Adaptive clipping
(Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021) moves the clip norm towards a target
quantile of the update norms with a privately estimated fraction of unclipped updates.

Only floating tensors are updates; integer buffers (such as BatchNorm's batch counter) are
not released under DP (their delta is zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .discrete import IntegerNoise, discrete_gaussian

__all__ = ["COUNT_SENSITIVITY", "AdaptiveClipping", "ClippedUpdate", "clip_update", "l2_norm"]


def l2_norm(update: Weights) -> float:
    """The L2 norm of all floating tensors of ``update`` taken as one vector (in float64)."""
    total = 0.0
    for array in update.values():
        if array.dtype.kind == "f":
            flat = np.asarray(array, dtype=np.float64).reshape(-1)
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


@dataclass(frozen=True)
class ClippedUpdate:
    """An update scaled to L2 norm at most ``clip_norm``."""

    update: Weights
    norm: float  # the norm before clipping
    clipped: bool  # True when the update was scaled down


def _scaled(update: Weights, scale: float) -> Weights:
    out: Weights = {}
    for name, array in update.items():
        if array.dtype.kind == "f":
            out[name] = (np.asarray(array, dtype=np.float64) * scale).astype(array.dtype)
        else:
            out[name] = np.zeros_like(array)
    return out


def clip_update(update: Weights, clip_norm: float) -> ClippedUpdate:
    """Scale ``update`` so its L2 norm is at most ``clip_norm`` (new arrays; input untouched).

    The bound holds for the stored values, after rounding to each tensor's dtype.
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ConfigError(f"the clip norm must be a positive number, got {clip_norm}")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or Inf values; it cannot be clipped")
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    out = _scaled(update, scale)
    # Rounding to float32 (or float16) can push the norm a hair above the bound: shrink until
    # the stored values satisfy it.
    shrink = 1e-7
    for _ in range(64):
        if l2_norm(out) <= clip_norm:
            return ClippedUpdate(out, norm, scale < 1.0)
        scale *= 1.0 - shrink
        shrink = min(2 * shrink, 0.5)
        out = _scaled(update, scale)
    raise AssertionError("clipping did not converge")  # pragma: no cover


#: How much one worker can move the sum of unclipped bits: its bit is a raw 0 or 1 (replace
#: its data and the bit flips), and the number of updates ``n`` is released with every round,
#: so centring the bits at +-1/2 would not help (the centred sum is the raw one minus n/2).
COUNT_SENSITIVITY = 1.0


@dataclass
class AdaptiveClipping:
    """Quantile-tracking clip norm (Andrew et al., NeurIPS 2021, Algorithm 1).

    Each round, every worker reports the bit ``b = [||update|| <= C]``; the coordinator
    releases ``b_mean = (sum b + N_Z(0, count_noise_std^2)) / n`` (exact integer noise) and moves the clip norm
    geometrically: ``C <- C * exp(-learning_rate * (b_mean - target_quantile))``.

    Releasing the noisy count costs privacy. The update sum (sensitivity ``C``, noise
    ``z_update C``) and the bit count (sensitivity :data:`COUNT_SENSITIVITY` = 1, noise
    ``count_noise_std``) together are one Gaussian mechanism of multiplier ``z`` when
    ``z^-2 = z_update^-2 + (count_noise_std / 1)^-2`` (Gaussian mechanisms compose exactly:
    Dong, Roth and Su 2022, Corollary 3.3), so
    ``z_update = (z^-2 - count_noise_std^-2)^(-1/2)``: the accountant charges ``z``, the update
    sum is noised with ``z_update``. (Andrew et al.'s Theorem 1 has ``(2 count_noise_std)^-2``
    for bits centred at +-1/2 under add/remove; the raw bits here move by 1, and fedcore
    releases ``n``, which makes add/remove moot.)
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    #: None: chosen when the noise multiplier is known, see :meth:`resolve`.
    count_noise_std: float | None = None

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"the initial clip norm must be positive, got {self.clip_norm}")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"the target quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise ConfigError(f"the clip learning rate must be positive, got {self.learning_rate}")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ConfigError(
                "adaptive clipping needs noise on the unclipped count "
                f"(count_noise_std > 0), got {self.count_noise_std}"
            )

    def resolve(self, noise_multiplier: float, expected_updates: int) -> None:
        """Pick the count noise when none was given: ``expected_updates / 20`` as Andrew et al.
        suggest, but at least ``2 * noise_multiplier`` (so the update noise grows by <= 16%)."""
        if self.count_noise_std is None:
            self.count_noise_std = max(expected_updates / 20, 2 * noise_multiplier)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """The multiplier for the update sum so that update + count cost ``noise_multiplier``."""
        if self.count_noise_std is None:
            raise ConfigError("adaptive clipping's count noise is not set; call resolve() first")
        count_multiplier = self.count_noise_std / COUNT_SENSITIVITY
        budget = noise_multiplier**-2 - count_multiplier**-2
        if budget <= 0:
            raise ConfigError(
                f"adaptive clipping with count noise {self.count_noise_std:g} spends the whole "
                f"budget of noise multiplier {noise_multiplier:g}; raise the count noise above "
                f"{noise_multiplier * COUNT_SENSITIVITY:g} (Andrew et al. suggest expected "
                "workers / 20)"
            )
        return float(budget**-0.5)

    def update(
        self, unclipped: float, count: int, sampler: IntegerNoise = discrete_gaussian
    ) -> float:
        """Move the clip norm after a round where ``unclipped`` of ``count`` updates fit.

        Returns the noisy fraction of unclipped updates that was released. The count is an
        integer (rounded: an honest bit moves it by exactly 1 whatever the others reported)
        and gets exact discrete-Gaussian noise from ``sampler``.
        """
        if count < 1:
            raise ValueError("adaptive clipping needs at least one update")
        if self.count_noise_std is None:
            raise ConfigError("adaptive clipping's count noise is not set; call resolve() first")
        if not math.isfinite(unclipped):
            raise ValueError(f"the unclipped count must be finite, got {unclipped}")
        noise = int(sampler(self.count_noise_std, 1)[0])
        noisy = (round(unclipped) + noise) / count
        self.clip_norm *= math.exp(-self.learning_rate * (noisy - self.target_quantile))
        return float(noisy)
