"""A DP-SGD silo with a canary record, through :class:`~fedcore.privacy.DPSGD` (Opacus).

One run trains a fresh, zero-initialised logistic regression (``nn.Linear(1, 2)``) for one
round of the real DP-SGD training loop: Opacus' Poisson sampling, per-example clipping and
noise, and the silo's accountant, whose report is the claim. The batch size covers the whole
silo, so the sampling rate is 1 and one step is one Gaussian release.

Neighbouring inputs under DP-SGD's privacy unit, one record replaced (silo sizes are public):
the silo's last record is the canary (``D``) or its mirror image (``D'``). The ordinary records
have ``x = 0`` (their gradients only move the biases); the canary has a large ``x`` and label
1, so its clipped gradient moves the weights by ``C`` along ``(-1, +1) / sqrt(2)``, and the
mirror (``-x``) by ``C`` the other way: the two outputs differ by ``2 C``, the most a replaced
record can move them. The score is the trained weights' projection on that direction.

Opacus draws the noise from torch's default generator and fedcore samples the batches from
the OS's CSPRNG. The adapter seeds the former from the harness (inside
``torch.random.fork_rng``, so the process's generator is left as it was) and leaves the
latter alone: DP-SGD runs are not replayable from a seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedcore.plan import TrainConfig
from fedcore.privacy.dpsgd import DPSGD
from fedcore.training import Batch

from .mechanism import Claim

__all__ = ["DPSGDSilo"]


@dataclass(frozen=True)
class DPSGDSilo:
    """One DP-SGD round of a silo (see the module docstring).

    Args:
        noise_multiplier: DP-SGD's ``z``.
        delta: the delta the silo reports its epsilon at.
        records: ordinary records besides the canary.
        noise_factor: 1 as built; 0.5 trains with half the multiplier while the claim stays
            that of the full one (the positive control "halved noise").
    """

    noise_multiplier: float
    delta: float
    max_grad_norm: float = 1.0
    records: int = 4
    noise_factor: float = 1.0

    @functools.cached_property
    def claim(self) -> Claim:
        """The silo's own report after one round of the full-noise build (a dry run)."""
        full = replace(self, noise_factor=1.0)
        return Claim(full._train(False, np.random.default_rng(0))[1], self.delta)

    @functools.cached_property
    def _reported(self) -> float:
        """What this build's accountant reports (a dry run): every run must report the same."""
        return self._train(False, np.random.default_rng(0))[1]

    @property
    def description(self) -> str:
        return (
            f"DPSGD (Opacus) one step at sampling rate 1, z={self.noise_multiplier:.4g}, "
            f"{self.records} records; a canary record replaced by its mirror image"
        )

    def _train(self, canary: bool, rng: np.random.Generator) -> tuple[nn.Linear, float]:
        """One round: the trained model and the epsilon the silo reports."""
        x = [[0.0]] * self.records + [[1000.0 if canary else -1000.0]]
        y = [i % 2 for i in range(self.records)] + [1]
        data = cast("Dataset[Batch]", TensorDataset(torch.tensor(x), torch.tensor(y)))
        model = nn.Linear(1, 2)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        built = self.noise_multiplier * self.noise_factor
        silo = DPSGD(
            noise_multiplier=built,
            max_grad_norm=self.max_grad_norm,
            delta=self.delta,
        )
        config = TrainConfig(epochs=1, batch_size=self.records + 1, learning_rate=1.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**63)))
            result = silo(model, data, config, torch.device("cpu"))
        return model, result.metrics["dpsgd_epsilon"]

    def run(self, canary: bool, rng: np.random.Generator) -> float:
        model, reported = self._train(canary, rng)
        if not math.isclose(reported, self._reported, rel_tol=1e-9):
            raise AssertionError(
                f"the silo reported epsilon {reported} here and {self._reported} in a dry run "
                "with the mirrored canary: the report depends on the data"
            )
        weight = model.weight.detach().double().reshape(-1)
        return float(weight[1] - weight[0]) / math.sqrt(2)
