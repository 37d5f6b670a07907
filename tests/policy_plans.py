"""A test strategy: FedAvg whose plans state client-level DP (clip norm and noise multiplier),
so real worker processes account rounds in their privacy ledgers.

Run with ``PYTHONPATH=tests fed-server --strategy policy_plans:StatedDPFedAvg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedcore.plan import TrainConfig
from fedcore.policy.check import DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY
from fedcore.strategy import FitInstruction, WorkerInfo
from fedcore.strategy.fedavg import FedAvg


class StatedDPFedAvg(FedAvg):
    """FedAvg that states ``noise-multiplier`` and ``clip-norm`` in every plan."""

    def __init__(self, *, noise_multiplier: float = 2.0, clip_norm: float = 1.0) -> None:
        self.dp = {DP_CLIP_KEY: clip_norm, DP_NOISE_MULTIPLIER_KEY: noise_multiplier}

    def configure_fit(
        self, round_number: int, workers: Sequence[WorkerInfo], config: TrainConfig
    ) -> list[FitInstruction]:
        return [
            FitInstruction(i.worker, replace(i.config, extra={**i.config.extra, **self.dp}))
            for i in super().configure_fit(round_number, workers, config)
        ]
