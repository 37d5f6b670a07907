"""The coordinator's analytics settings (``fed-server --scientists ...``) and their flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import ConfigError

__all__ = ["AnalyticsSettings", "add_analytics_flags", "analytics_settings_from_args"]


@dataclass(frozen=True)
class AnalyticsSettings:
    """Serve the Analytics service to the data scientists enrolled in ``scientists``.

    Args:
        scientists: their enrollment file (``fed-certs add-scientist``).
        only: serve queries only: run no training, stay up until stopped.
        default_delta: the delta of a query that states none.
        phase_timeout: seconds each step of a query's secure round may take.
        signed: run each query's round in the signed mode (``--secagg-signed``): the silos
            sign their keys and check each other's view of the round, as in training.
        refusal_limit: refused queries a scientist may have within ``refusal_window``; past
            it their queries are refused by the coordinator (RESOURCE_EXHAUSTED) unasked.
        refusal_window: seconds the refusals are counted over (a sliding window).
    """

    scientists: Path
    only: bool = False
    default_delta: float = 1e-6
    phase_timeout: float = 30.0
    signed: bool = False
    refusal_limit: int = 20
    refusal_window: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.default_delta < 1:
            raise ConfigError(f"--analytics-delta must be in (0, 1), got {self.default_delta}")
        if not self.phase_timeout > 0:
            raise ConfigError("--analytics-phase-timeout must be positive")
        if self.refusal_limit < 1:
            raise ConfigError(
                f"--analytics-refusal-limit must be at least 1, got {self.refusal_limit}"
            )
        if not self.refusal_window > 0:
            raise ConfigError("--analytics-refusal-window must be positive")


def add_analytics_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "federated analytics (docs/analytics.md)",
        "Serve authenticated data scientists: dataset search by tag, mock previews, and "
        "aggregate queries answered under secure aggregation with each silo's DP noise.",
    )
    g.add_argument(
        "--scientists",
        type=Path,
        metavar="FILE",
        help="enrolled data scientists (scientists.json written by fed-certs add-scientist); "
        "turns the Analytics service on",
    )
    g.add_argument(
        "--analytics-only",
        action="store_true",
        help="serve queries only: no training rounds; run until stopped (SIGINT/SIGTERM)",
    )
    g.add_argument(
        "--analytics-delta",
        type=float,
        default=1e-6,
        help="delta of queries that state none (default: %(default)s)",
    )
    g.add_argument(
        "--analytics-phase-timeout",
        type=float,
        default=30.0,
        help="seconds each step of a query's secure round may take (default: %(default)s)",
    )
    g.add_argument(
        "--analytics-refusal-limit",
        type=int,
        default=AnalyticsSettings.refusal_limit,
        metavar="N",
        help="refused queries a data scientist may have within --analytics-refusal-window; "
        "past it the coordinator refuses their queries itself, without asking the silos "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--analytics-refusal-window",
        type=float,
        default=AnalyticsSettings.refusal_window,
        metavar="SECONDS",
        help="the sliding window refusals are counted over (default: %(default)s)",
    )


def analytics_settings_from_args(args: argparse.Namespace) -> AnalyticsSettings | None:
    if args.scientists is None:
        if args.analytics_only:
            raise ConfigError("--analytics-only needs --scientists (who may ask queries)")
        return None
    return AnalyticsSettings(
        args.scientists,
        args.analytics_only,
        args.analytics_delta,
        args.analytics_phase_timeout,
        refusal_limit=args.analytics_refusal_limit,
        refusal_window=args.analytics_refusal_window,
        signed=bool(getattr(args, "secagg_signed", False)),
    )
