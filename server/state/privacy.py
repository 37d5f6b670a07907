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


@dataclass(frozen=True)
class DPSettings:
    """Client-level DP of a federation (see ``fed-server --help``, "differential privacy")."""

    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    mode: DPMode = "central"
    adaptive_quantile: float | None = None
    clip_learning_rate: float = 0.2
    count_noise: float | None = None
    accountant: Mechanism = "best"

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(
                "differential privacy needs --dp-noise-multiplier, --dp-target-epsilon or both"
            )
        if not self.clip > 0:
            raise ConfigError(f"--dp-clip must be positive, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")


def add_dp_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--dp-*`` flags of ``fed-server``."""
    g = parser.add_argument_group(
        "differential privacy (client-level DP-FedAvg: protects each worker's whole data)"
    )
    g.add_argument(
        "--dp-noise-multiplier",
        type=float,
        help="turn DP on: Gaussian noise std on the sum of updates = this x --dp-clip",
    )
    g.add_argument(
        "--dp-target-epsilon",
        type=float,
        help="privacy budget: stop before a round would exceed it; without "
        "--dp-noise-multiplier the multiplier is calibrated to spend it over --rounds",
    )
    g.add_argument(
        "--dp-clip",
        type=float,
        default=1.0,
        help="L2 clip norm of every update (the initial one with --dp-adaptive-quantile) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--dp-delta",
        type=float,
        default=1e-5,
        help="delta of the (epsilon, delta) guarantee; keep it below 1/workers (default: %(default)s)",
    )
    g.add_argument(
        "--dp-mode",
        choices=["central", "distributed"],
        default="central",
        help="who adds the noise: the coordinator, or each worker its share before secure "
        "aggregation masks it (needs --secagg) (default: %(default)s)",
    )
    g.add_argument(
        "--dp-adaptive-quantile",
        type=float,
        help="adaptive clipping (Andrew et al. 2021): the clip norm tracks this quantile of "
        "update norms, e.g. 0.5 (central mode)",
    )
    g.add_argument(
        "--dp-clip-lr",
        type=float,
        default=0.2,
        help="adaptive clipping's geometric learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--dp-count-noise",
        type=float,
        help="noise std on adaptive clipping's unclipped count (default: max(workers/20, "
        "2 x noise multiplier))",
    )
    g.add_argument(
        "--dp-accountant",
        choices=["best", "rdp", "pld"],
        default="best",
        help="dp-accounting's accountant. Client-level DP's noise is a discrete Gaussian, "
        "proven in Rényi DP: best and rdp both account it by Rényi DP, pld is refused "
        "(docs/privacy.md) (default: %(default)s)",
    )


def dp_settings_from_args(args: argparse.Namespace) -> DPSettings | None:
    """The settings the flags ask for, or None when DP is off."""
    if args.dp_noise_multiplier is None and args.dp_target_epsilon is None:
        return None
    return DPSettings(
        clip=args.dp_clip,
        noise_multiplier=args.dp_noise_multiplier,
        target_epsilon=args.dp_target_epsilon,
        delta=args.dp_delta,
        mode=args.dp_mode,
        adaptive_quantile=args.dp_adaptive_quantile,
        clip_learning_rate=args.dp_clip_lr,
        count_noise=args.dp_count_noise,
        accountant=args.dp_accountant,
    )


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
