"""The coordinator's differential-privacy settings: flags, the strategy wrapper, metrics.

``fed-server --dp-noise-multiplier Z --dp-clip C`` (or ``--dp-target-epsilon E``) wraps the
federation's strategy in :class:`~fedcore.privacy.DifferentialPrivacy`; every round's metrics
line then carries the largest epsilon any worker has spent so far at ``--dp-delta``, each
worker's (``privacy.workers``), and the per-silo ``(epsilon, delta)`` that DP-SGD workers
report (``privacy.silos``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedcore.errors import ConfigError
from fedcore.flags import add_flags, flag_values, setting
from fedcore.privacy import AdaptiveClipping, DifferentialPrivacy, DPMode, PrivacyReporting
from fedcore.privacy.accountant import Mechanism
from fedcore.privacy.client import UNCLIPPED_METRIC
from fedcore.privacy.dpsgd import DPSGD_METRICS
from fedcore.strategy import FitResult, Strategy

__all__ = [
    "DPSettings",
    "add_dp_flags",
    "dp_settings_from_args",
    "privacy_metrics",
    "public_train_metrics",
    "wrap_strategy",
]

_PRIVATE_METRICS = frozenset({UNCLIPPED_METRIC, *DPSGD_METRICS})


#: The "differential privacy" group of ``fed-server --help``.
_GROUP = "differential privacy (client-level DP-FedAvg: protects each worker's whole data)"


@dataclass(frozen=True)
class DPSettings:
    """Client-level DP of a federation (see ``fed-server --help``, "differential privacy")."""

    clip: float = setting(
        1.0,
        "L2 clip norm of every update (the initial one with --dp-adaptive-quantile)",
        flag="--dp-clip",
    )
    noise_multiplier: float | None = setting(
        None,
        "turn DP on: Gaussian noise std on the sum of updates = this x --dp-clip",
        flag="--dp-noise-multiplier",
    )
    target_epsilon: float | None = setting(
        None,
        "privacy budget: stop before a round would exceed it; without "
        "--dp-noise-multiplier the multiplier is calibrated to spend it over --rounds",
        flag="--dp-target-epsilon",
    )
    delta: float = setting(
        1e-5,
        "delta of the (epsilon, delta) guarantee; keep it below 1/workers",
        flag="--dp-delta",
    )
    mode: DPMode = setting(
        "central",
        "who adds the noise: the coordinator, or each worker its share before secure "
        "aggregation masks it (needs --secagg)",
        flag="--dp-mode",
    )
    adaptive_quantile: float | None = setting(
        None,
        "adaptive clipping (Andrew et al. 2021): the clip norm tracks this quantile of "
        "update norms, e.g. 0.5 (central mode)",
        flag="--dp-adaptive-quantile",
    )
    clip_learning_rate: float = setting(
        0.2, "adaptive clipping's geometric learning rate", flag="--dp-clip-lr"
    )
    count_noise: float | None = setting(
        None,
        "noise std on adaptive clipping's unclipped count (default: max(workers/20, "
        "2 x noise multiplier))",
        flag="--dp-count-noise",
    )
    accountant: Mechanism = setting(
        "best",
        "dp-accounting's accountant. Client-level DP's noise is a discrete Gaussian, "
        "proven in Rényi DP: best and rdp both account it by Rényi DP, pld is refused "
        "(docs/privacy.md)",
        flag="--dp-accountant",
        choices=("best", "rdp", "pld"),  # the order --help has always listed
    )

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(
                "differential privacy needs --dp-noise-multiplier, --dp-target-epsilon or both"
            )
        if not self.clip > 0:
            raise ConfigError(f"--dp-clip must be positive, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")


#: The order of the ``--dp-*`` flags in ``fed-server --help``.
_DP_FLAG_ORDER = (
    "noise_multiplier",
    "target_epsilon",
    "clip",
    "delta",
    "mode",
    "adaptive_quantile",
    "clip_learning_rate",
    "count_noise",
    "accountant",
)


def add_dp_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--dp-*`` flags of ``fed-server``, built from :class:`DPSettings`."""
    add_flags(parser.add_argument_group(_GROUP), DPSettings, only=_DP_FLAG_ORDER)


def dp_settings_from_args(args: argparse.Namespace) -> DPSettings | None:
    """The settings the flags ask for, or None when DP is off."""
    if args.dp_noise_multiplier is None and args.dp_target_epsilon is None:
        return None
    return DPSettings(**flag_values(DPSettings, args))


def wrap_strategy(
    strategy: Strategy,
    settings: DPSettings,
    *,
    rounds: int,
    min_updates: int,
    secure_aggregation: bool,
) -> DifferentialPrivacy:
    """``strategy`` made client-level private as ``settings`` ask."""
    if settings.mode == "distributed" and not secure_aggregation:
        raise ConfigError(
            "--dp-mode distributed only protects against the coordinator when secure "
            "aggregation hides each worker's lightly-noised update: add --secagg, or use "
            "--dp-mode central"
        )
    adaptive = (
        AdaptiveClipping(
            clip_norm=settings.clip,
            target_quantile=settings.adaptive_quantile,
            learning_rate=settings.clip_learning_rate,
            count_noise_std=settings.count_noise,
        )
        if settings.adaptive_quantile is not None
        else None
    )
    return DifferentialPrivacy(
        strategy,
        noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clip,
        delta=settings.delta,
        target_epsilon=settings.target_epsilon,
        rounds=rounds,
        mode=settings.mode,
        min_updates=min_updates,
        adaptive=adaptive,
        secure_aggregation=secure_aggregation,
        mechanism=settings.accountant,
    )


def privacy_metrics(strategy: Strategy, results: Sequence[FitResult]) -> dict[str, Any] | None:
    """A round's privacy line: client-level spend (the largest and each worker's) and the
    DP-SGD silos' own (epsilon, delta)."""
    out: dict[str, Any] = {}
    if isinstance(strategy, PrivacyReporting):
        out.update(strategy.privacy_metrics())
        workers = strategy.worker_epsilons()
        if workers:
            out["workers"] = workers
    silos = {
        r.worker.name: {"epsilon": r.metrics["dpsgd_epsilon"], "delta": r.metrics["dpsgd_delta"]}
        for r in results
        if "dpsgd_epsilon" in r.metrics and "dpsgd_delta" in r.metrics
    }
    if silos:
        out["silos"] = dict(sorted(silos.items()))
    return out or None


def public_train_metrics(results: Sequence[FitResult]) -> list[FitResult]:
    """Results without the privacy bookkeeping metrics (they are not averaged)."""
    return [
        FitResult(
            r.worker,
            r.num_examples,
            {k: v for k, v in r.metrics.items() if k not in _PRIVATE_METRICS},
        )
        for r in results
    ]
