"""A client-level DP-FedAvg round with a canary worker, as the coordinator runs it.

One run is one round of the real :class:`~fedcore.privacy.DifferentialPrivacy` wrapper around
FedAvg: every worker's plan carries the DP request, each worker privatizes its update with
:func:`~fedcore.privacy.privatize_update` (in distributed mode adding its noise share there),
the wrapper's aggregator sums them (re-clipping in central mode), and ``aggregate_fit`` adds
the central noise, charges its accountant and releases the new global weights and its privacy
report.

Neighbouring inputs: the canary worker takes part in both (a cross-silo cohort is public, and
the release states how many updates it averaged). In ``D`` it sends the canary update, a
vector along the first coordinate far longer than the clip norm; in ``D'`` it sends a zero
update. This "zero-out" relation (Kairouz et al., ICML 2021) is the one a round accounted at
sampling rate 1 with sensitivity ``C`` protects. The other workers send zero updates.

The distinguisher reads the released weights and report: the noisy sum along the canary's
direction (mean times the number aggregated) and, under adaptive clipping, the noisy count
of unclipped updates (the canary is clipped, a zero update is not), weighted as the
likelihood-ratio test of the two Gaussians does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcore.plan import TrainConfig
from fedcore.privacy import (
    AdaptiveClipping,
    ClientDP,
    DifferentialPrivacy,
    DPMode,
    privatize_update,
)
from fedcore.privacy.discrete import IntegerNoise, discrete_gaussian
from fedcore.strategy import (
    FedAvg,
    FitResult,
    StreamingAggregator,
    UpdateAggregator,
    WorkerInfo,
)
from fedcore.weights import Weights

from .mechanism import Claim, ScaledNoise

__all__ = ["FedAvgRound", "RawBitsAdaptiveClipping"]


class RawBitsAdaptiveClipping(AdaptiveClipping):
    """Adaptive clipping as on main before issue 22: Andrew et al.'s split of the noise,
    ``z_upd = (z^-2 - (2 sigma_b)^-2)^-1/2``, which holds for bits centred at +-1/2, applied
    to a sum of raw 0/1 bits (sensitivity 1). Kept here, frozen, as a positive control."""

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        assert self.count_noise_std is not None
        budget = noise_multiplier**-2 - (2 * self.count_noise_std) ** -2
        return float(budget**-0.5)

    def update(
        self, unclipped: float, count: int, sampler: IntegerNoise = discrete_gaussian
    ) -> float:
        assert self.count_noise_std is not None
        noisy = (unclipped + int(sampler(self.count_noise_std, 1)[0])) / count
        self.clip_norm *= math.exp(-self.learning_rate * (noisy - self.target_quantile))
        return float(noisy)


@dataclass(frozen=True)
class FedAvgRound:
    """One DP-FedAvg round (see the module docstring).

    Args:
        noise_multiplier: the ``z`` the strategy is configured with (and charges).
        delta: the delta the strategy reports its epsilon at.
        workers: workers in the round, the canary worker included.
        adaptive: builds the round's adaptive clipping (None: a fixed clip norm).
        noise_factor: 1 as built; 0.5 is the positive control "halved noise".
        mode: ``"central"`` or ``"distributed"`` (each worker adds ``z C / sqrt(workers)``).
    """

    noise_multiplier: float
    delta: float
    clip_norm: float = 1.0
    workers: int = 3
    adaptive: Callable[[], AdaptiveClipping] | None = None
    noise_factor: float = 1.0
    mode: DPMode = "central"
    #: The canary worker skips its own clip (and noise share) and sends its update raw: in
    #: central mode the coordinator's clip of each streamed update must still bound it.
    lying_worker: bool = False

    @functools.cached_property
    def claim(self) -> Claim:
        """The strategy's own report after one round (a dry run without the canary)."""
        report = self._round(False, np.random.default_rng(0))[1]
        return Claim(report["epsilon"], report["delta"])

    @property
    def description(self) -> str:
        clipping = "adaptive clipping" if self.adaptive is not None else "fixed clip norm"
        return (
            f"DifferentialPrivacy(FedAvg) {self.mode} noise, z={self.noise_multiplier:.4g}, "
            f"{clipping}, {self.workers} workers; canary update vs zero update"
        )

    def _sampler(self, sigma: float, size: int) -> npt.NDArray[np.int64]:
        """The coordinator's exact noise, at ``noise_factor`` of its sigma (OpenDP draws from
        its own CSPRNG: central rounds are not replayable from the harness's seed)."""
        return discrete_gaussian(sigma * self.noise_factor, size)

    def _strategy(self) -> DifferentialPrivacy:
        return DifferentialPrivacy(
            FedAvg(),
            noise_multiplier=self.noise_multiplier,
            clipping_norm=self.clip_norm,
            delta=self.delta,
            adaptive=self.adaptive() if self.adaptive is not None else None,
            mode=self.mode,
            min_updates=self.workers if self.mode == "distributed" else 1,
            sampler=self._sampler,
        )

    def _round(
        self, canary: bool, rng: np.random.Generator
    ) -> tuple[Weights, dict[str, float], DifferentialPrivacy]:
        """One round: the released weights, the privacy report, the strategy."""
        noise = rng if self.noise_factor == 1 else ScaledNoise(rng.bit_generator, self.noise_factor)
        dp = self._strategy()
        start: Weights = {"w": np.zeros(2)}
        roster = [WorkerInfo(f"id{i}", f"worker-{i}", 1) for i in range(self.workers)]
        instructions = dp.configure_fit(1, roster, TrainConfig())
        aggregator = dp.start_aggregation(1, start)
        if isinstance(aggregator, StreamingAggregator):  # as the coordinator starts a round
            aggregator.expect(float(self.workers))
        results = []
        for i, instruction in enumerate(instructions):
            request = ClientDP.from_extra(instruction.config.extra)
            assert request is not None
            trained = {"w": np.array([10.0 * self.clip_norm, 0.0])} if canary and i == 0 else start
            update = privatize_update(start, trained, request, rng=noise)
            sent = np.add(start["w"], update.delta["w"])
            if self.lying_worker and canary and i == 0:
                sent = trained["w"]
            _upload(aggregator, sent)
            results.append(FitResult(instruction.worker, 1, update.metrics))
        released = dp.aggregate_fit(1, start, aggregator.result(), results, [])
        return released, dp.privacy_metrics(), dp

    def run(self, canary: bool, rng: np.random.Generator) -> float:
        released, report, dp = self._round(canary, rng)
        if not math.isclose(report["epsilon"], self.claim.epsilon, rel_tol=1e-9):
            raise AssertionError(
                f"the strategy reported epsilon {report['epsilon']} with the canary's input and "
                f"{self.claim.epsilon} without: the report depends on the data"
            )
        n = report["aggregated"]
        noisy_sum = float(released["w"][0]) * n / self.clip_norm  # the round started at 0
        if dp.adaptive is None:
            return noisy_sum
        sigma_b = dp.adaptive.count_noise_std
        assert sigma_b is not None
        z_update = dp.adaptive.update_noise_multiplier(self.noise_multiplier)
        # D: the canary's bit is 0 (clipped); D': its zero update's bit is 1.
        missing = n - report["unclipped_fraction"] * n
        return noisy_sum / z_update**2 + missing / sigma_b**2


def _upload(aggregator: UpdateAggregator, values: npt.NDArray[np.float64]) -> None:
    """One worker's update as the coordinator takes it: a streaming strategy's (the DP
    wrapper's) piece by piece, one element per piece, then committed; otherwise whole."""
    if not isinstance(aggregator, StreamingAggregator):
        aggregator.add({"w": values}, 1)
        return
    stream = aggregator.open({"w": (values.shape, values.dtype)}, 1)
    for start in range(values.size):
        if not stream.fold("w", start, values[start : start + 1]):
            raise AssertionError("an audit upload's stream was closed while it was folded")
    if not aggregator.commit(stream, 1):
        raise AssertionError("an audit upload's stream was not committed")
