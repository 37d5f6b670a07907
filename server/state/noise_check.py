"""A start-up check of client-level differential privacy: will the noise drown the model?

DP-FedAvg adds Gaussian noise of std ``z * C`` to the *sum* of clipped updates and divides by
the ``n`` updates aggregated, so every coordinate of the new global model moves by noise of
std ``z * C / n`` each round. With few silos that is easily larger than the weights themselves
(``z = 3, C = 1, n = 3``: std 1.0 per coordinate, about 30x the RMS of mnist-mlp's initial
weights), and training diverges to NaN within a few rounds. Client-level DP needs many
clients; a handful of silos protect their records with record-level DP-SGD instead.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedcore.weights import Weights

__all__ = ["NOISE_TO_WEIGHTS_LIMIT", "check_noise_scale", "weights_rms"]

log = logging.getLogger("fedcore.server")

#: Noise std per coordinate and round above this fraction of the weights' RMS gets a warning.
NOISE_TO_WEIGHTS_LIMIT = 0.1


def weights_rms(weights: Weights) -> float:
    """The root mean square of all floating-point coordinates of ``weights``."""
    total, count = 0.0, 0
    for array in weights.values():
        if array.dtype.kind == "f":
            total += float(np.square(array, dtype=np.float64).sum())
            count += array.size
    return math.sqrt(total / count) if count else 0.0


def check_noise_scale(
    *, noise_multiplier: float, clip_norm: float, min_updates: int, weights: Weights
) -> float:
    """Log the expected noise std per coordinate of the average update, ``z * C / n``, and
    warn when it is large against the initial weights' RMS; return the std."""
    std = noise_multiplier * clip_norm / min_updates
    rms = weights_rms(weights)
    ratio = std / rms if rms > 0 else math.inf
    if ratio > NOISE_TO_WEIGHTS_LIMIT:
        log.warning(
            "differential privacy adds noise of std %.3g to every coordinate of the model each "
            "round (noise multiplier %g x clip %g / %d updates), %.3gx the RMS %.3g of the "
            "initial weights: the model may drown in noise (NaN) within a few rounds. "
            "Client-level DP needs many workers: raise --min-workers/--min-results, lower "
            "--dp-noise-multiplier (a larger epsilon), or with few silos use record-level "
            "DP-SGD on the workers instead (fed-worker --dpsgd-noise-multiplier, no --dp-* "
            "flags here)",
            std,
            noise_multiplier,
            clip_norm,
            min_updates,
            ratio,
            rms,
        )
    else:
        log.info(
            "differential privacy: noise std %.3g per coordinate and round (%.3gx the initial "
            "weights' RMS)",
            std,
            ratio,
        )
    return std
