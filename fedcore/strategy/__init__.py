"""Strategies decide who trains, with what settings, and how results are combined.

The API is one ABC, :class:`Strategy` (see :mod:`fedcore.strategy.base`); the built-ins are
small classes on top of it:

==============  =============================================================================
fedavg          :class:`FedAvg` (McMahan et al. 2017)
fedavgm         :class:`FedAvgM`, server momentum (Hsu et al. 2019)
fedprox         :class:`FedProx`, proximal term on the workers (Li et al. 2020)
fedadagrad      :class:`FedAdagrad` \\
fedadam         :class:`FedAdam`     > server optimizers (Reddi et al. 2021)
fedyogi         :class:`FedYogi`    /
median          :class:`CoordinateMedian` \\ (Yin et al. 2018)
trimmed-mean    :class:`TrimmedMean`      /
krum            :class:`Krum`       \\ (Blanchard et al. 2017)
multi-krum      :class:`MultiKrum`  /
fedbuff         :class:`FedBuff`, asynchronous buffered aggregation (Nguyen et al. 2022)
==============  =============================================================================
"""

from __future__ import annotations

from .base import (
    AsyncSettings,
    EvaluateResult,
    Failure,
    FitInstruction,
    FitResult,
    PieceSink,
    Strategy,
    StrategyState,
    StreamingAggregator,
    UpdateAggregator,
    WeightedMeanAggregator,
    WorkerInfo,
    check_round_size,
    check_secure_aggregation,
    weighted_metrics,
)
from .fedavg import PROXIMAL_MU, FedAvg, FedProx
from .fedbuff import FedBuff, StalenessWeightedAggregator
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from .registry import (
    BUILTIN_STRATEGIES,
    describe_strategies,
    load_strategy,
    strategy_by_name,
    strategy_options,
)
from .robust import (
    BufferingAggregator,
    CoordinateMedian,
    Krum,
    MultiKrum,
    SpoolingAggregator,
    TrimmedMean,
)
from .sampling import ClientSampler
from .streaming import UpdateAccess, UpdateStream

__all__ = [
    "BUILTIN_STRATEGIES",
    "PROXIMAL_MU",
    "AsyncSettings",
    "BufferingAggregator",
    "ClientSampler",
    "CoordinateMedian",
    "EvaluateResult",
    "Failure",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "FitInstruction",
    "FitResult",
    "Krum",
    "MultiKrum",
    "PieceSink",
    "ServerOptimizer",
    "SpoolingAggregator",
    "StalenessWeightedAggregator",
    "Strategy",
    "StrategyState",
    "StreamingAggregator",
    "TrimmedMean",
    "UpdateAccess",
    "UpdateAggregator",
    "UpdateStream",
    "WeightedMeanAggregator",
    "WorkerInfo",
    "check_round_size",
    "check_secure_aggregation",
    "describe_strategies",
    "load_strategy",
    "strategy_by_name",
    "strategy_options",
    "weighted_metrics",
]
