"""Per-worker accounting from the rounds each worker actually took part in.

Amplification by sampling (accounting a round at ``q = workers sampled / population``) holds
only when whether a worker takes part is secret and random from the adversary's view. A
cohort drawn from a seeded generator over public worker names is computable by anyone with
the configuration, and the coordinator always knows whom it asked; so fedcore accounts each
worker at ``q = 1`` over the rounds it was sampled in. The federation's epsilon is the largest
of these: the guarantee every worker gets. A worker never sampled has spent nothing.

Workers are keyed by name (unique in a federation and stable across reconnects, unlike the
ids the coordinator assigns in join order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedcore.errors import ConfigError

from .accountant import Mechanism, PrivacyAccountant, epsilon_of_history

__all__ = ["ParticipationAccountant"]


class ParticipationAccountant:
    """One q = 1 history per worker, charged for every round the worker was sampled in."""

    def __init__(self, *, mechanism: Mechanism = "best") -> None:
        self.mechanism: Mechanism = mechanism
        self._workers: dict[str, PrivacyAccountant] = {}
        # Workers sampled alike share their history: epsilon is computed once per history.
        self._cache: dict[tuple[float, tuple[tuple[float, float, int], ...]], float] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def rounds(self, name: str) -> int:
        """Rounds ``name`` was charged for."""
        accountant = self._workers.get(name)
        return len(accountant) if accountant is not None else 0

    def charge(self, names: Iterable[str], *, noise_multiplier: float) -> None:
        """One round of multiplier ``noise_multiplier`` for each worker in ``names``."""
        for name in set(names):
            accountant = self._workers.setdefault(name, PrivacyAccountant(mechanism=self.mechanism))
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)

    def _of(self, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
        key = (delta, history)
        epsilon = self._cache.get(key)
        if epsilon is None:
            epsilon = epsilon_of_history(history, delta=delta, mechanism=self.mechanism)
            self._cache[key] = epsilon
        return epsilon

    def epsilon(self, name: str, *, delta: float) -> float:
        """Epsilon spent so far by ``name`` at ``delta`` (0 if never sampled)."""
        accountant = self._workers.get(name)
        return self._of(tuple(accountant.history), delta) if accountant is not None else 0.0

    def epsilons(self, *, delta: float) -> dict[str, float]:
        """Every charged worker's epsilon at ``delta``, by name."""
        return {name: self.epsilon(name, delta=delta) for name in sorted(self._workers)}

    def max_epsilon(self, *, delta: float) -> float:
        """The largest epsilon any worker has spent (0 before any charge)."""
        return max(self.epsilons(delta=delta).values(), default=0.0)

    def max_epsilon_after(
        self, names: Iterable[str], *, noise_multiplier: float, delta: float
    ) -> float:
        """The largest epsilon of any worker if ``names`` took part in one more round."""
        chosen = set(names)
        worst = 0.0
        for name in chosen | set(self._workers):
            accountant = self._workers.get(name)
            history = list(accountant.history) if accountant is not None else []
            if name in chosen:
                history.append((noise_multiplier, 1.0, 1))
            worst = max(worst, self._of(tuple(_merged(history)), delta))
        return worst

    def state_dict(self) -> dict[str, Any]:
        """A JSON-friendly checkpoint: every worker's history."""
        return {
            "mechanism": self.mechanism,
            "workers": {name: a.state_dict() for name, a in sorted(self._workers.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint written by :meth:`state_dict`."""
        workers = state.get("workers")
        if not isinstance(workers, Mapping):
            raise ConfigError("the checkpoint has no per-worker privacy histories")
        restored: dict[str, PrivacyAccountant] = {}
        for name, worker_state in workers.items():
            accountant = PrivacyAccountant(mechanism=self.mechanism)
            accountant.load_state_dict(worker_state)
            restored[str(name)] = accountant
        self._workers = restored


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """``history`` with consecutive equal parameters merged (as the accountant stores it), so
    equal histories share one cache entry."""
    out: list[tuple[float, float, int]] = []
    for z, q, n in history:
        if out and out[-1][:2] == (z, q):
            out[-1] = (z, q, out[-1][2] + n)
        else:
            out.append((z, q, n))
    return out
