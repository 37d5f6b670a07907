"""Client sampling: which of the connected workers take part in a round."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from fedcore.errors import ConfigError

__all__ = ["ClientSampler"]


class _Identified(Protocol):
    """Anything with a worker id and name (a :class:`~fedcore.strategy.WorkerInfo`)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def name(self) -> str: ...


W = TypeVar("W", bound=_Identified)


@dataclass(frozen=True)
class ClientSampler:
    """Sample ``max(min_workers, ceil(fraction * n))`` of the ``n`` available workers (all of
    them when fewer are available), uniformly without replacement.

    The draw depends only on ``seed``, the round number and the set of worker names, so a
    round is reproducible: a restarted coordinator, or a simulation whose workers join in
    another order, draws the same cohort. (Names, not ids: the coordinator numbers workers in
    the order they join, names are unique in a federation and chosen by the workers.)
    ``fraction=1`` (the default) takes every worker, as in McMahan et al. (2017) with C = 1.

    Reproducible means public: anyone with the configuration can compute every cohort, so the
    draw is no secret sampling and differential privacy claims no amplification from it
    (:mod:`fedcore.privacy.participation` accounts each worker over the rounds it was in).
    """

    fraction: float = 1.0
    min_workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction-fit must be in (0, 1], got {self.fraction}")
        if self.min_workers < 1:
            raise ConfigError(f"min-fit-workers must be at least 1, got {self.min_workers}")

    def num_sampled(self, available: int) -> int:
        """How many workers a round with ``available`` workers samples."""
        wanted = max(self.min_workers, math.ceil(self.fraction * available - 1e-9))
        return min(wanted, available)

    def sample(self, round_number: int, workers: Sequence[W]) -> list[W]:
        """The workers of ``round_number``, in name order."""
        ordered = sorted(workers, key=lambda w: w.name)
        k = self.num_sampled(len(ordered))
        if k == len(ordered):
            return ordered
        rng = np.random.default_rng([self.seed, round_number])
        chosen = rng.choice(len(ordered), size=k, replace=False)
        return [ordered[i] for i in sorted(chosen)]
