"""What the auditor needs from a mechanism: run it once on one of two neighbouring inputs.

An adapter wraps a mechanism *as deployed* (the real strategy, query pipeline or training
loop, not a re-implementation) and answers two things:

* :attr:`AuditedMechanism.claim`: the ``(epsilon, delta)`` the code reports for one release;
* :meth:`AuditedMechanism.run`: run the mechanism once, on the input with the canary (``D``)
  or without it (``D'``), and return the score a distinguisher reads from what the mechanism
  *releases* (larger: more canary-like; ``-inf`` where the release leaves no score, such as a
  refusal).

Swapping in a broken variant is then a matter of building the adapter with another part:
:class:`ScaledNoise` is a noise source that draws ``factor`` times the standard deviation
asked of it, which turns any mechanism that takes a generator into a build with less noise
than it accounts for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["AuditedMechanism", "Claim", "ScaledNoise"]


@dataclass(frozen=True)
class Claim:
    """The privacy a mechanism reports for one release."""

    epsilon: float
    delta: float


class AuditedMechanism(Protocol):
    """One mechanism under audit (see the module docstring)."""

    @property
    def claim(self) -> Claim:
        """What the code reports for one run."""
        ...

    @property
    def description(self) -> str:
        """One line: the code path, the neighbouring inputs and the canary."""
        ...

    def run(self, canary: bool, rng: np.random.Generator) -> float:
        """Run once on ``D`` (``canary`` True) or ``D'``; the distinguisher's score.

        ``rng`` is the harness's source of randomness: an adapter gives it to the mechanism
        wherever the mechanism takes a generator (so an audit can be replayed from a seed),
        and leaves the mechanism's own CSPRNG in place wherever it does not.
        """
        ...


class ScaledNoise(np.random.Generator):
    """A generator whose normal draws have ``factor`` times the asked standard deviation.

    Handed to a mechanism as its noise source, ``ScaledNoise(bits, 0.5)`` is "a build with
    halved noise": the mechanism still reports the epsilon of the full noise.
    """

    def __init__(self, bit_generator: np.random.BitGenerator, factor: float) -> None:
        super().__init__(bit_generator)
        self.factor = factor

    def normal(self, loc: Any = 0.0, scale: Any = 1.0, size: Any = None) -> Any:
        return super().normal(loc, np.multiply(scale, self.factor), size)
