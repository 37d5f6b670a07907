"""FedAvg and FedProx: the weighted mean of the workers' models becomes the global model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedcore.errors import ConfigError
from fedcore.plan import PROXIMAL_MU, TrainConfig
from fedcore.weights import Weights

from .base import FitInstruction, Strategy, UpdateAggregator, WeightedMeanAggregator, WorkerInfo
from .streaming import UpdateAccess

__all__ = ["PROXIMAL_MU", "FedAvg", "FedProx"]


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al., AISTATS 2017): the example-weighted mean of the
    workers' weights becomes the new global model."""

    update_access = UpdateAccess.STREAM

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return WeightedMeanAggregator()


class FedProx(Strategy):
    """FedProx (Li et al., MLSys 2020): FedAvg whose workers minimize
    ``loss(w) + mu/2 ||w - w_global||^2``, which keeps heterogeneous silos from drifting.

    ``mu`` travels in the plan (``TrainConfig.extra["proximal_mu"]``); the default training
    loop (:func:`fedcore.training.train`) adds the proximal term.
    """

    update_access = UpdateAccess.STREAM

    def __init__(self, *, mu: float = 0.01) -> None:
        if mu < 0:
            raise ConfigError(f"FedProx mu cannot be negative, got {mu}")
        self.mu = float(mu)

    def configure_fit(
        self, round_number: int, workers: Sequence[WorkerInfo], config: TrainConfig
    ) -> list[FitInstruction]:
        return [
            FitInstruction(
                i.worker, replace(i.config, extra={**i.config.extra, PROXIMAL_MU: self.mu})
            )
            for i in super().configure_fit(round_number, workers, config)
        ]

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return WeightedMeanAggregator()
