"""Settings of secure aggregation and the per-round choices derived from them: the Shamir
threshold and the SecAgg+ neighbourhood graph."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.errors import ConfigError

__all__ = ["SecAggParams", "harary_neighbours"]


@dataclass(frozen=True)
class SecAggParams:
    """What ``fed-server --secagg`` is told.

    Args:
        threshold: the Shamir threshold ``t``: a count (>= 2), or a fraction in (0, 1) of the
            sharing group (``floor(f * m) + 1``; the default 0.5 is a strict majority).
        neighbours: 0 for the complete graph (Bonawitz et al.); ``k`` > 0 for SecAgg+ (Bell et
            al.): every worker shares keys and masks with ``k`` neighbours of a random
            k-regular graph (odd ``k`` is rounded up to even).
        bits: signed quantization bits per coordinate.
        clip: every coordinate of a worker's delta is clipped to ``[-clip, clip]``.
        phase_timeout: seconds the coordinator waits for each key, share and unmasking phase.
        signed: the signed mode (silo-signed keys bound to the round, a consistency check
            before unmasking): resists an active coordinator; workers need a roster.
        job: what signed rounds are bound to and workers key their participation by.
    """

    threshold: float = 0.5
    neighbours: int = 0
    bits: int = 16
    clip: float = 1.0
    phase_timeout: float = 30.0
    signed: bool = False
    job: str = ""

    def __post_init__(self) -> None:
        if not (
            0 < self.threshold < 1 or (self.threshold >= 2 and float(self.threshold).is_integer())
        ):
            raise ConfigError(
                f"--secagg-threshold must be a fraction in (0, 1) or a whole count >= 2, "
                f"got {self.threshold}"
            )
        if self.neighbours < 0:
            raise ConfigError("--secagg-neighbours cannot be negative (0: all workers)")
        if not 2 <= self.bits <= 48:
            raise ConfigError(f"--secagg-bits must be in 2..48, got {self.bits}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--secagg-clip must be positive, got {self.clip}")
        if self.phase_timeout <= 0:
            raise ConfigError("--secagg-phase-timeout must be positive")

    def group_size(self, num_workers: int) -> int:
        """Members of each sharing group (a worker and its neighbours)."""
        degree = self.degree(num_workers)
        return degree + 1

    def degree(self, num_workers: int) -> int:
        """Neighbours per worker among ``num_workers``."""
        if self.neighbours == 0 or self.neighbours >= num_workers - 1:
            return num_workers - 1
        return self.neighbours + (self.neighbours % 2)

    @property
    def min_workers(self) -> int:
        """The fewest workers a round can have: the threshold count, and never fewer than 2
        (the coordinator learns only a sum, which one worker's update would be)."""
        return max(2, int(self.threshold)) if self.threshold >= 1 else 2

    def threshold_for(self, num_workers: int) -> int:
        """The Shamir threshold of a round with ``num_workers`` selected workers."""
        m = self.group_size(num_workers)
        if self.threshold < 1:
            return max(2, math.floor(self.threshold * m) + 1)
        t = int(self.threshold)
        if t > m:
            raise ConfigError(
                f"--secagg-threshold {t} exceeds the sharing group of {m} workers; "
                "lower it or select more workers"
            )
        return t


def harary_neighbours(
    members: Sequence[int], degree: int, rng: random.Random
) -> dict[int, frozenset[int]]:
    """A random ``degree``-regular graph over ``members`` (Bell et al.'s construction: a
    Harary graph on a random permutation); the complete graph when ``degree >= n - 1``."""
    n = len(members)
    if degree >= n - 1:
        everyone = frozenset(members)
        return {m: everyone - {m} for m in members}
    order = list(members)
    rng.shuffle(order)
    half = degree // 2
    graph: dict[int, set[int]] = {m: set() for m in members}
    for i, m in enumerate(order):
        for step in range(1, half + 1):
            other = order[(i + step) % n]
            graph[m].add(other)
            graph[other].add(m)
    return {m: frozenset(peers) for m, peers in graph.items()}
