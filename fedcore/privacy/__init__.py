"""Differential privacy for fedcore.

Client-level DP (DP-FedAvg, McMahan et al. ICLR 2018) protects each *worker's* whole
contribution: workers clip their update (:mod:`.client`), Gaussian noise is added to the sum
centrally or shared among workers (:mod:`.noise`), and the coordinator wraps its strategy in
:class:`DifferentialPrivacy`. Record-level DP (DP-SGD, Abadi et al. CCS 2016) protects each
*record* inside a silo (:class:`DPSGD`, through Opacus). Both are accounted with Google's
``dp-accounting`` (:class:`PrivacyAccountant`).
"""

from __future__ import annotations

from .accountant import Mechanism, PrivacyAccountant, calibrate_noise_multiplier
from .aggregation import UniformDeltaAggregator
from .client import ClientDP, PrivatizedUpdate, privatize_update
from .clipping import AdaptiveClipping, ClippedUpdate, clip_update, l2_norm
from .noise import (
    add_gaussian_noise,
    distributed_noise_std,
    effective_noise_multiplier,
    secure_generator,
)
from .strategy import DifferentialPrivacy, DPMode, PrivacyReporting

__all__ = [
    "AdaptiveClipping",
    "ClientDP",
    "ClippedUpdate",
    "DPMode",
    "DifferentialPrivacy",
    "Mechanism",
    "PrivacyAccountant",
    "PrivacyReporting",
    "PrivatizedUpdate",
    "UniformDeltaAggregator",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_update",
    "distributed_noise_std",
    "effective_noise_multiplier",
    "l2_norm",
    "privatize_update",
    "secure_generator",
]
