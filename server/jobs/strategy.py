"""A job's strategy: the one it names (or is given), wrapped for DP, checked against its round."""

from __future__ import annotations

from fedcore.errors import ConfigError
from fedcore.privacy import DifferentialPrivacy
from fedcore.strategy import (
    Strategy,
    check_round_size,
    check_secure_aggregation,
    load_strategy,
)

from ..state.config import ServerConfig
from ..state.privacy import wrap_strategy

__all__ = ["prepare_strategy"]


def prepare_strategy(config: ServerConfig, strategy: Strategy | None) -> Strategy:
    """The federation's strategy (``config.strategy`` unless one is given), made
    differentially private when ``config.dp`` asks, and checked against secure aggregation."""
    chosen = strategy or load_strategy(config.strategy, config.strategy_options)
    secure = config.secagg is not None
    if config.dp is not None:
        chosen = wrap_strategy(
            chosen,
            config.dp,
            rounds=config.rounds,
            min_updates=config.results_needed,
            secure_aggregation=secure,
        )
    elif isinstance(chosen, DifferentialPrivacy) and chosen.secure_aggregation != secure:
        raise ConfigError(
            f"the DifferentialPrivacy strategy was built with secure_aggregation="
            f"{chosen.secure_aggregation}, but the federation runs "
            f"{'with' if secure else 'without'} --secagg; pass secure_aggregation={secure}"
        )
    check_secure_aggregation(chosen, secure_aggregation=secure)
    if chosen.async_settings is None:
        check_round_size(
            chosen,
            results_needed=config.results_needed,
            flag="--min-results" if config.min_results is not None else "--min-workers",
        )
    if config.compression != "none" and chosen.async_settings is not None:
        raise ConfigError(
            f"--compression {config.compression} is not supported with the asynchronous "
            f"strategy {config.strategy}; use a synchronous strategy or drop --compression"
        )
    return chosen
