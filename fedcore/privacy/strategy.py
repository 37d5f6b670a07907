"""DP-FedAvg as a wrapper around any strategy (McMahan, Ramage, Talwar and Zhang, ICLR 2018).

``DifferentialPrivacy(strategy, noise_multiplier=z, clipping_norm=C)`` asks every sampled
worker to clip its update (delta from the global weights) to L2 norm ``C`` before it leaves the
worker — before secure aggregation masks it — and releases

    global + (sum of clipped deltas + N(0, (z C)^2 I)) / n

where ``n`` is the number of updates *actually aggregated* (not the number configured or
sampled), with every update weighted the same: example-count weights would let one silo
dominate the average and break the sensitivity bound ``C``. The inner strategy sees the
noised aggregate (post-processing), so server optimizers (FedAvgM, FedOpt) compose.

The noise is added by the coordinator (``mode="central"``) or shared among the workers
(``mode="distributed"``, see :mod:`fedcore.privacy.noise` for dropouts). Central noise is
exact: the coordinator rounds the clipped sum to a grid of ``2^-20 C`` (the rounding covered
in the sensitivity, as in distributed mode) and adds a discrete Gaussian there (OpenDP's
sampler, :mod:`fedcore.privacy.discrete`); adaptive clipping's count too. Both modes are
therefore accounted by Rényi DP, where the discrete Gaussian's privacy is proven (Canonne,
Kamath and Steinke 2020); the continuous Gaussian's PLD is no proven bound for it. Each worker is
accounted at ``q = 1`` over the rounds it was sampled in (a seeded cohort is no secret, so no
amplification by sampling is claimed; see :mod:`fedcore.privacy.participation`); the reported
epsilon is the largest worker's. With ``target_epsilon`` the federation ends before a round
would take any worker past the budget (:class:`~fedcore.errors.PrivacyBudgetExhausted`), and
without ``noise_multiplier`` the multiplier is calibrated so that a worker sampled in every one
of ``rounds`` rounds stays within the target. Adaptive clipping (Andrew et al., NeurIPS 2021)
is accounted as part of the same mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from fedcore.errors import ConfigError, PrivacyBudgetExhausted, RoundFailedError
from fedcore.plan import TrainConfig
from fedcore.strategy import (
    EvaluateResult,
    Failure,
    FitInstruction,
    FitResult,
    Strategy,
    StrategyState,
    UpdateAccess,
    UpdateAggregator,
    WorkerInfo,
)
from fedcore.weights import Weights

from .accountant import Mechanism, calibrate_noise_multiplier
from .aggregation import UniformDeltaAggregator
from .client import UNCLIPPED_METRIC, ClientDP
from .clipping import AdaptiveClipping
from .discrete import IntegerNoise, discrete_gaussian
from .noise import add_ring_noise, central_step, effective_noise_multiplier
from .participation import ParticipationAccountant

__all__ = ["DPMode", "DifferentialPrivacy", "PrivacyReporting", "UniformDeltaAggregator"]

log = logging.getLogger("fedcore.privacy")

DPMode = Literal["central", "distributed"]


@runtime_checkable
class PrivacyReporting(Protocol):
    """A strategy whose rounds have a privacy cost to put in the metrics."""

    def privacy_metrics(self) -> dict[str, float]:
        """The privacy spent so far and the last round's DP parameters."""
        ...

    def worker_epsilons(self) -> dict[str, float]:
        """Each worker's epsilon so far, by name."""
        ...


@dataclass
class _Round:
    cohort: tuple[str, ...]  # names of the workers sampled: each is charged for the round
    noise_multiplier: float  # z charged by the accountant (before dropouts)
    clip_norm: float
    aggregator: UniformDeltaAggregator | None = None


class DifferentialPrivacy(Strategy):
    """Client-level DP around ``strategy`` (DP-FedAvg; wraps, never subclasses the inner).

    Args:
        strategy: the strategy to make private; it must not need individual updates.
        noise_multiplier: ``z``; noise std on the sum is ``z * C``. None: calibrated from
            ``target_epsilon`` and ``rounds`` at the first round (when the sampling rate is known).
        clipping_norm: ``C``, the L2 bound of every update (the initial one when adaptive).
        delta: the delta at which epsilon is reported and budgeted.
        target_epsilon: the budget: no round is started that would exceed it.
        rounds: rounds planned (needed to calibrate ``noise_multiplier``).
        mode: ``"central"`` (the coordinator adds the noise) or ``"distributed"``.
        min_updates: fewest updates a round may aggregate; in distributed mode each worker's
            noise share is ``z C / sqrt(min_updates)``.
        adaptive: adaptive clipping settings (central mode only).
        secure_aggregation: updates arrive already summed (see :class:`UniformDeltaAggregator`).
        mechanism: the accountant: ``"rdp"`` or ``"best"``, both Rényi DP (the noise is a
            discrete Gaussian, whose privacy is proven in Rényi DP; ``"pld"`` is refused).
        sampler: the exact noise source (default: OpenDP's discrete Gaussian; an auditor
            injects a weaker one as a positive control).

    Updates stream (``UpdateAccess.STREAM``) whatever the inner strategy declares: the
    wrapper's own aggregator spools each upload and clips it from the values received
    (:mod:`.aggregation`), so the clip the accounting assumes is the one enforced.
    """

    update_access = UpdateAccess.STREAM

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float | None,
        clipping_norm: float,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        mode: DPMode = "central",
        min_updates: int = 1,
        adaptive: AdaptiveClipping | None = None,
        secure_aggregation: bool = False,
        mechanism: Mechanism = "best",
        sampler: IntegerNoise = discrete_gaussian,
    ) -> None:
        if strategy.async_settings is not None:
            raise ConfigError(
                f"strategy {type(strategy).__name__} aggregates asynchronously; DP-FedAvg is "
                "accounted per synchronous round: choose a synchronous strategy"
            )
        if strategy.needs_individual_updates:
            raise ConfigError(
                f"strategy {type(strategy).__name__} must see individual updates; DP-FedAvg "
                "bounds the sensitivity of the mean only: choose a mean-based strategy"
            )
        if mode not in ("central", "distributed"):
            raise ConfigError(f"DP mode must be 'central' or 'distributed', got {mode!r}")
        if not clipping_norm > 0:
            raise ConfigError(f"the clip norm must be positive, got {clipping_norm}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if noise_multiplier is None:
            if target_epsilon is None or rounds is None:
                raise ConfigError(
                    "give a noise multiplier, or a target epsilon and a round count to "
                    "calibrate one from"
                )
        elif not noise_multiplier > 0:
            raise ConfigError(f"the noise multiplier must be positive, got {noise_multiplier}")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ConfigError(f"the target epsilon must be positive, got {target_epsilon}")
        if min_updates < 1:
            raise ConfigError(f"min_updates must be at least 1, got {min_updates}")
        if adaptive is not None and mode == "distributed":
            raise ConfigError(
                "adaptive clipping needs each worker's clipped/unclipped bit, which distributed "
                "mode would reveal to the coordinator; use mode central or a fixed clip norm"
            )
        # The noise is a discrete Gaussian (central: the coordinator's; distributed: the
        # workers' shares under secure aggregation); its privacy is proven in Rényi
        # (concentrated) DP (CKS20; Kairouz et al. 2021 for sums of shares), so the continuous
        # Gaussian's PLD is no proven bound for it.
        if mechanism == "pld":
            raise ConfigError(
                "client-level DP is accounted by Rényi DP (its discrete-Gaussian noise has no "
                "proven PLD); use --dp-accountant rdp or best"
            )
        mechanism = "rdp"
        self.inner = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.rounds = rounds
        self.mode: DPMode = mode
        self.min_updates = min_updates
        self.adaptive = adaptive
        self.secure_aggregation = secure_aggregation
        self.accountant = ParticipationAccountant(mechanism=mechanism)
        self._sampler = sampler
        self._rounds: dict[int, _Round] = {}
        self._report: dict[str, float] = {}
        if adaptive is not None:
            adaptive.clip_norm = clipping_norm
        if noise_multiplier is not None and adaptive is not None:
            adaptive.resolve(noise_multiplier, min_updates)
            adaptive.update_noise_multiplier(noise_multiplier)  # fail early if impossible

    # ------------------------------------------------------------------ configuration

    @property
    def clip_norm(self) -> float:
        """The clip norm of the next round."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.clipping_norm

    @property
    def required_updates(self) -> int:
        return self.inner.required_updates

    def _update_multiplier(self, z: float) -> float:
        return self.adaptive.update_noise_multiplier(z) if self.adaptive is not None else z

    def configure_fit(
        self, round_number: int, workers: Sequence[WorkerInfo], config: TrainConfig
    ) -> list[FitInstruction]:
        instructions = self.inner.configure_fit(round_number, workers, config)
        if not instructions:
            return instructions
        cohort = tuple(i.worker.name for i in instructions)
        if self.mode == "distributed" and len(instructions) < self.min_updates:
            raise ConfigError(
                f"round {round_number} samples {len(instructions)} worker(s) but distributed "
                f"noise needs at least {self.min_updates}; sample more workers"
            )
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None
            assert self.rounds is not None
            # Any worker may be sampled in every round: calibrate for that one.
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                sample_rate=1.0,
                steps=self.rounds,
                mechanism=self.accountant.mechanism,
            )
            log.info(
                "calibrated noise multiplier %.4f for epsilon %g at delta %g over %d rounds",
                self.noise_multiplier,
                self.target_epsilon,
                self.delta,
                self.rounds,
            )
            if self.adaptive is not None:
                self.adaptive.resolve(self.noise_multiplier, len(instructions))
            self._update_multiplier(self.noise_multiplier)
        z = self.noise_multiplier
        if self.target_epsilon is not None:
            after = self.accountant.max_epsilon_after(cohort, noise_multiplier=z, delta=self.delta)
            if after > self.target_epsilon:
                spent = self.accountant.max_epsilon(delta=self.delta)
                raise PrivacyBudgetExhausted(
                    f"round {round_number} would take a worker to epsilon {after:.4f}, past the "
                    f"target {self.target_epsilon:g} (delta {self.delta:g}); stopping after round "
                    f"{round_number - 1} with the most-charged worker at epsilon {spent:.4f}"
                )
        clip = self.clip_norm
        # Distributed mode states m; each worker derives its share z C / sqrt(m) itself.
        request = ClientDP(
            clip_norm=clip,
            report_unclipped=self.adaptive is not None,
            noise_multiplier=z,
            min_updates=self.min_updates if self.mode == "distributed" else None,
        ).to_extra()
        self._rounds = {round_number: _Round(cohort, z, clip)}
        return [
            replace(i, config=replace(i.config, extra={**i.config.extra, **request}))
            for i in instructions
        ]

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        state = self._rounds.get(round_number)
        if state is None:
            raise ConfigError(f"round {round_number} was not configured by configure_fit")
        enforce = (
            state.clip_norm if self.mode == "central" and not self.secure_aggregation else None
        )
        state.aggregator = UniformDeltaAggregator(
            global_weights, presummed=self.secure_aggregation, enforce_clip=enforce
        )
        return state.aggregator

    # ------------------------------------------------------------------ release

    def aggregate_fit(
        self,
        round_number: int,
        global_weights: Weights,
        aggregate: Weights,
        results: Sequence[FitResult],
        failures: Sequence[Failure],
    ) -> Weights:
        state = self._rounds.get(round_number)
        if state is None or state.aggregator is None:
            raise ConfigError(f"round {round_number} has no DP aggregator; call start_aggregation")
        n = state.aggregator.units
        if n < self.min_updates:
            raise RoundFailedError(
                f"round {round_number} aggregated {n} update(s), fewer than the {self.min_updates} "
                "the noise was calibrated for; nothing is released"
            )
        z = state.noise_multiplier
        noised = dict(aggregate)
        if self.mode == "central":
            sums = {k: v.copy() for k, v in state.aggregator.delta_sum().items()}
            step = central_step(
                clip_norm=state.clip_norm,
                float_error=self._sum_error(global_weights, n, state.clip_norm),
            )
            add_ring_noise(
                sums,
                noise_multiplier=self._update_multiplier(z),
                sensitivity=state.clip_norm,
                shares=1,
                step=step,
                sampler=self._sampler,
            )
            for name, total in sums.items():
                base = global_weights[name]
                noised[name] = np.add(base, total / n, dtype=np.float64).astype(base.dtype)
            charged = z
        else:
            charged = effective_noise_multiplier(
                noise_multiplier=z, aggregated=n, min_updates=self.min_updates
            )
        # Every sampled worker is charged, delivered or not (the safe side).
        self.accountant.charge(state.cohort, noise_multiplier=charged)
        report = {
            "epsilon": self.accountant.max_epsilon(delta=self.delta),
            "delta": self.delta,
            "noise_multiplier": charged,
            "clip_norm": state.clip_norm,
            "sampled": float(len(state.cohort)),
            "most_rounds": float(max(self.accountant.rounds(w) for w in state.cohort)),
            "aggregated": float(n),
        }
        if self.adaptive is not None:
            unclipped = sum(r.metrics.get(UNCLIPPED_METRIC, 0.0) for r in results)
            report["unclipped_fraction"] = self.adaptive.update(unclipped, n, self._sampler)
        self._report = report
        del self._rounds[round_number]
        return self.inner.aggregate_fit(round_number, global_weights, noised, results, failures)

    def _sum_error(self, global_weights: Weights, n: int, clip: float) -> float:
        """A bound on each coordinate's floating-point error in the clipped sum: float64
        summation of ``n`` deltas of norm at most ``clip``; under secure aggregation, the mean
        arrives rounded to the model's dtype (around the public global weights), times ``n``."""
        error = n * n * clip * 2.0**-52
        if self.secure_aggregation:
            floats = [b for b in global_weights.values() if b.dtype.kind == "f"]
            largest = max((float(np.abs(b).max(initial=0.0)) for b in floats), default=0.0)
            epsilon = max((float(np.spacing(np.ones((), b.dtype))) for b in floats), default=0.0)
            error += n * (largest + clip) * epsilon
        return error

    def privacy_metrics(self) -> dict[str, float]:
        return dict(self._report)

    def worker_epsilons(self) -> dict[str, float]:
        return self.accountant.epsilons(delta=self.delta)

    # ------------------------------------------------------------------ delegation

    def configure_evaluate(
        self, round_number: int, workers: Sequence[WorkerInfo]
    ) -> list[WorkerInfo]:
        return self.inner.configure_evaluate(round_number, workers)

    def aggregate_evaluate(
        self, round_number: int, results: Sequence[EvaluateResult]
    ) -> dict[str, float]:
        return self.inner.aggregate_evaluate(round_number, results)

    @property
    def may_stop_early(self) -> bool:
        return self.inner.may_stop_early

    def on_round_end(self, round_number: int, weights: Weights, metrics: Mapping[str, Any]) -> bool:
        return self.inner.on_round_end(round_number, weights, metrics)

    def state_dict(self) -> StrategyState:
        """The inner strategy's state, every worker's privacy history, the clip norm and the
        multiplier: enough to resume the budget after a restart."""
        return {
            "inner": self.inner.state_dict(),
            "participation": self.accountant.state_dict(),
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        if "participation" not in state:
            raise ConfigError(
                "the checkpoint's privacy history predates per-worker accounting (it holds one "
                "history at a sampling rate, not who took part in which round); it cannot be "
                "resumed under a valid budget: start a new federation"
            )
        self.accountant.load_state_dict(state["participation"])
        self.noise_multiplier = state.get("noise_multiplier", self.noise_multiplier)
        if self.adaptive is not None:
            self.adaptive.clip_norm = float(state["clip_norm"])
        else:
            self.clipping_norm = float(state["clip_norm"])
