"""An analytics query with and without one row, through the worker's real pipeline.

One run answers one query over ``silos`` tables as the workers and the coordinator do: the
query text is parsed and laid out against the public schema (:func:`plan_layout`), each silo
computes its exact local sums (:func:`local_sums`), divides them by their scales, rounds
them to the secure-aggregation ring and adds its discrete-Gaussian share of the noise
(:func:`noisy_share`), and the total of the shares is the released vector (secure
aggregation unmasks the exact sum of what the silos sent).

Each silo trusts all ``silos`` silos to add their shares (``honest-silos`` = the number of
silos): the least noise any policy lets a silo add, so the weakest deployment is audited.

Neighbouring inputs: silo 0's table with the canary row (``D``) or with the replacement row
in its place (``D'``), the replace-one relation the query's noise is calibrated for (table
sizes are public). The score is the released value of the first sum (the count, or the sum of
the canary's column), or ``-inf`` when a silo refused.

``admission`` is a rule a silo would apply to its exact counts before anything is charged.
None is deployed since issue 22 (no refusal reads the data); :class:`ExactMinCountRefusal`
freezes the rule fedcore had before (refuse when a cell holds fewer than ``min_count``
records), the positive control "a free refusal".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedcore.analytics.layout import Layout, plan_layout
from fedcore.analytics.local import local_sums
from fedcore.analytics.mechanism import epsilon_for, noise_multiplier_for, noisy_share
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import FeatureInfo
from fedcore.data.table import Table
from fedcore.errors import TaskRefused

from .mechanism import Claim

__all__ = [
    "Admission",
    "AnalyticsQuery",
    "ExactMinCountRefusal",
]


class Admission(Protocol):
    """A silo's rule on its exact cell counts; raises :class:`TaskRefused` to refuse."""

    def __call__(self, layout: Layout, cell_counts: npt.NDArray[np.int64]) -> None: ...


@dataclass(frozen=True)
class ExactMinCountRefusal:
    """Refuse exactly when a cell's exact count is below ``min_count`` (frozen control)."""

    min_count: int

    def __call__(self, layout: Layout, cell_counts: npt.NDArray[np.int64]) -> None:
        if int(cell_counts.min(initial=self.min_count)) < self.min_count:
            raise TaskRefused("analytics.min-count", "a cell holds too few records")


#: The audit's table: one numeric column with public bounds.
SCHEMA = {"x": FeatureInfo("x", dtype="float64", minimum=-10.0, maximum=10.0)}


def _table(values: Sequence[float]) -> Table:
    return Table({"x": np.asarray(values, dtype=np.float64)}, len(values))


@dataclass(frozen=True)
class AnalyticsQuery:
    """One query over ``silos`` silos (see the module docstring).

    Args:
        query: the query text (over column ``x``, bounds ``[-10, 10]``).
        epsilon, delta: what the data scientist asks for; the noise is calibrated to it.
        rows: silo 0's other rows.
        others: every other silo's rows (None: the same as ``rows``).
        canary: the canary row's value of ``x`` (in ``D``).
        replacement: the value of ``x`` of the row in its place (in ``D'``).
        admission: the silos' rule on exact counts (None: none).
        noise_factor: 1 as built; 0.5 is the positive control "halved noise".
    """

    query: str
    epsilon: float
    delta: float
    rows: Sequence[float] = field(default_factory=lambda: [1.0] * 20)
    others: Sequence[float] | None = None
    canary: float = 10.0
    replacement: float = -10.0
    silos: int = 3
    admission: Admission | None = None
    noise_factor: float = 1.0

    @functools.cached_property
    def layout(self) -> Layout:
        return plan_layout(parse_query(self.query), SCHEMA)

    @functools.cached_property
    def noise_multiplier(self) -> float:
        return noise_multiplier_for(self.epsilon, self.delta)

    @functools.cached_property
    def claim(self) -> Claim:
        return Claim(epsilon_for(self.noise_multiplier, self.delta), self.delta)

    @property
    def description(self) -> str:
        rule = f", admission {self.admission}" if self.admission is not None else ""
        return (
            f"{self.query!r} at epsilon {self.epsilon:g} over {self.silos} silos{rule}; "
            f"one row x={self.canary:g} replaced by x={self.replacement:g} "
            f"({len(self.rows)} other rows)"
        )

    def run(self, canary: bool, rng: np.random.Generator) -> float:
        # The noise comes from OpenDP's CSPRNG as deployed: ``rng`` cannot seed it.
        del rng
        layout = self.layout
        z = self.noise_multiplier * self.noise_factor
        own = [*self.rows, self.canary if canary else self.replacement]
        others = self.rows if self.others is None else self.others
        tables = [_table(own), *(_table(others) for _ in range(self.silos - 1))]
        total = np.zeros(layout.words)
        for table in tables:
            sums = local_sums(layout, table)
            if self.admission is not None:
                try:
                    self.admission(layout, sums.cell_counts)
                except TaskRefused:
                    return -np.inf
            scaled = sums.values / layout.scale_vector()
            total += noisy_share(layout, scaled, z, self.silos)
        released = total * layout.scale_vector()
        # The canary raises the first sum (a count, or a sum of positive values).
        return float(released[0]) * (1.0 if self.canary >= 0 else -1.0)
