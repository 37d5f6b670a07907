"""Server-side optimizers: FedAvgM and the FedOpt family (FedAdagrad, FedAdam, FedYogi).

Each treats the round's weighted mean minus the global model as a pseudo-gradient
``delta = mean - global`` and takes one optimizer step on the global model. They only need the
weighted mean, so they run unchanged under secure aggregation. The strategies are thin: the
math lives in :class:`ServerOptimizer`, which they hold (composition, no FedOpt base class).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from fedcore.errors import ConfigError
from fedcore.weights import Weights

from .base import (
    Failure,
    FitResult,
    Strategy,
    StrategyState,
    UpdateAggregator,
    WeightedMeanAggregator,
)
from .streaming import UpdateAccess

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]

Rule = Literal["momentum", "adagrad", "adam", "yogi"]


class ServerOptimizer:
    """One optimizer step per round on the global model, from the pseudo-gradient
    ``delta = aggregate - global`` (only floating tensors; others take the aggregate).

    ``momentum`` (Hsu et al. 2019)::

        m = beta1 * m + delta;                     x = x + lr * m

    ``adagrad`` / ``adam`` / ``yogi`` (Reddi et al., ICLR 2021, Algorithm 2)::

        m = beta1 * m + (1 - beta1) * delta
        adagrad: v = v + delta^2
        adam:    v = beta2 * v + (1 - beta2) * delta^2
        yogi:    v = v - (1 - beta2) * delta^2 * sign(v - delta^2)
        x = x + lr * m / (sqrt(v) + tau)

    with ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper asks ``v_{-1} >= tau^2``).
    """

    def __init__(
        self, rule: Rule, *, lr: float, beta1: float, beta2: float = 0.0, tau: float = 0.0
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"server-lr must be positive, got {lr}")
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ConfigError(f"betas must be in [0, 1), got beta1={beta1}, beta2={beta2}")
        if rule != "momentum" and not tau > 0:
            raise ConfigError(f"tau must be positive, got {tau}")
        self.rule = rule
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, global_weights: Weights, aggregate: Weights) -> Weights:
        """The next global weights (``aggregate``'s buffers are reused)."""
        out: Weights = {}
        for name, avg_ in aggregate.items():
            x: np.ndarray = global_weights[name]
            avg: np.ndarray = avg_
            if x.dtype.kind != "f":
                out[name] = avg
                continue
            delta = np.subtract(avg, x, out=avg) if avg.flags.writeable else avg - x
            m = self.m.get(name)
            if m is None:
                m = self.m[name] = np.zeros_like(x)
            if self.rule == "momentum":
                m *= self.beta1
                m += delta
                out[name] = x + self.lr * m
                continue
            m *= self.beta1
            m += (1.0 - self.beta1) * delta
            v = self.v.get(name)
            if v is None:
                v = self.v[name] = np.full_like(x, self.tau**2)
            sq = np.square(delta, out=delta)  # delta is no longer needed
            if self.rule == "adagrad":
                v += sq
            elif self.rule == "adam":
                v *= self.beta2
                v += (1.0 - self.beta2) * sq
            else:  # yogi
                v -= (1.0 - self.beta2) * sq * np.sign(v - sq)
            out[name] = x + self.lr * m / (np.sqrt(v) + self.tau)
        self.steps += 1
        return out

    def state_dict(self) -> StrategyState:
        return {
            "steps": self.steps,
            "m": {k: a.copy() for k, a in self.m.items()},
            "v": {k: a.copy() for k, a in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.m = {k: np.array(a) for k, a in state["m"].items()}
        self.v = {k: np.array(a) for k, a in state["v"].items()}


class _ServerOptStrategy(Strategy):
    """Plumbing shared by the four strategies below: weighted mean, then one server step."""

    optimizer: ServerOptimizer
    update_access = UpdateAccess.STREAM

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        return WeightedMeanAggregator()

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Sequence[FitResult],
        failures: Sequence[Failure],
    ) -> Weights:
        return self.optimizer.step(global_weights, aggregate)

    def state_dict(self) -> StrategyState:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class FedAvgM(_ServerOptStrategy):
    """FedAvg with server momentum (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019). ``momentum=0, server_lr=1``
    is FedAvg."""

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.optimizer = ServerOptimizer("momentum", lr=server_lr, beta1=momentum)


class FedAdagrad(_ServerOptStrategy):
    """FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

    def __init__(self, *, server_lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> None:
        self.optimizer = ServerOptimizer("adagrad", lr=server_lr, beta1=beta1, tau=tau)


class FedAdam(_ServerOptStrategy):
    """FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.optimizer = ServerOptimizer("adam", lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)


class FedYogi(_ServerOptStrategy):
    """FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.optimizer = ServerOptimizer("yogi", lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
