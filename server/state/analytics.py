"""The coordinator's analytics settings (``fed-server --scientists ...``) and their flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.errors import ConfigError
from fedcore.flags import add_flags, flag_values, setting, setting_metadata

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

    scientists: Path = field(
        metadata=setting_metadata(
            "enrolled data scientists (scientists.json written by fed-certs add-scientist); "
            "turns the Analytics service on",
            metavar="FILE",
        )
    )
    only: bool = setting(
        False,
        "serve queries only: no training rounds; run until stopped (SIGINT/SIGTERM)",
        flag="--analytics-only",
    )
    default_delta: float = setting(
        1e-6, "delta of queries that state none", flag="--analytics-delta"
    )
    phase_timeout: float = setting(
        30.0,
        "seconds each step of a query's secure round may take",
        flag="--analytics-phase-timeout",
    )
    #: From ``--secagg-signed``: one switch for training's and analytics' rounds.
    signed: bool = False
    refusal_limit: int = setting(
        20,
        "refused queries a data scientist may have within --analytics-refusal-window; "
        "past it the coordinator refuses their queries itself, without asking the silos",
        flag="--analytics-refusal-limit",
        metavar="N",
    )
    refusal_window: float = setting(
        3600.0,
        "the sliding window refusals are counted over",
        flag="--analytics-refusal-window",
        metavar="SECONDS",
    )

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
    """The ``--scientists`` and ``--analytics-*`` flags, built from :class:`AnalyticsSettings`."""
    g = parser.add_argument_group(
        "federated analytics (docs/analytics.md)",
        "Serve authenticated data scientists: dataset search by tag, mock previews, and "
        "aggregate queries answered under secure aggregation with each silo's DP noise.",
    )
    add_flags(g, AnalyticsSettings)


def analytics_settings_from_args(args: argparse.Namespace) -> AnalyticsSettings | None:
    """The settings the flags ask for; None without ``--scientists``."""
    if args.scientists is None:
        if args.analytics_only:
            raise ConfigError("--analytics-only needs --scientists (who may ask queries)")
        return None
    return AnalyticsSettings(
        **flag_values(AnalyticsSettings, args),
        signed=bool(getattr(args, "secagg_signed", False)),
    )
