"""Settings of secure aggregation and the per-round choices derived from them: the Shamir
threshold and the SecAgg+ neighbourhood graph."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.flags import setting

__all__ = ["SecAggParams", "harary_neighbours"]


@dataclass(frozen=True)
class SecAggParams:
    """What ``fed-server --secagg`` is told (each field's help is its ``--secagg-*`` flag's).

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

    threshold: float = setting(
        0.5,
        "Shamir threshold t: a count >= 2, or a fraction f < 1 of each sharing group "
        "(t = floor(f*m)+1); a round survives while t workers remain",
        flag="--secagg-threshold",
    )
    neighbours: int = setting(
        0,
        "SecAgg+: share with this many neighbours of a random regular graph "
        "(about 2*log2(n) suffices); 0 = with every worker",
        flag="--secagg-neighbours",
    )
    bits: int = setting(16, "signed fixed-point bits per coordinate", flag="--secagg-bits")
    clip: float = setting(
        1.0,
        "clipping range: every coordinate of a worker's delta (trained minus received "
        "weights) is clipped to [-CLIP, CLIP]",
        flag="--secagg-clip",
    )
    phase_timeout: float = setting(
        30.0,
        "seconds the coordinator waits for each key, share and unmasking phase",
        flag="--secagg-phase-timeout",
    )
    signed: bool = setting(
        False,
        "the signed mode against an active coordinator, for training rounds and analytics "
        "queries alike: the workers sign their keys "
        "with their silo keys (fed-worker --signing-key --roster) and check each other's "
        "view of the round before unmasking (docs/secure-aggregation.md)",
        flag="--secagg-signed",
    )
    job: str = setting(
        "",
        "signed mode: the job name every key is bound to, and that workers key their "
        "participation records by (default: none; each round's fresh id still binds them)",
        flag="--secagg-job",
        show_default=False,
    )

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
