"""Statistics and their error bars from the noisy totals (post-processing: no privacy cost).

Error bars are the standard deviation the DP noise implies (first-order delta method for
ratios), not sampling error. Means and variances use the noisy count and centred sums::

    mean = c + S / N                     var = Q / N - (S / N)^2          std = sqrt(var)

Quantiles are read from a DP histogram of :data:`~.layout.QUANTILE_BINS` equal bins over the
column's bounds: negative noisy counts are set to 0, the cumulative distribution is
interpolated linearly inside the bin where it crosses ``q``. Their error bar is the spread
of that estimate over redraws of the noise around the released histogram (a parametric
bootstrap); the bins' width bounds the resolution.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .layout import Layout

__all__ = ["Answer", "Cell", "SiloSpend", "cells_from_totals", "quantiles_from_histogram"]

_BOOTSTRAP = 200


@dataclass(frozen=True)
class Cell:
    """One released cell: ``group`` is "" without group-by, else a category."""

    group: str
    value: float = math.nan
    std_error: float = math.nan
    values: tuple[float, ...] = ()
    std_errors: tuple[float, ...] = ()
    count: float = 0.0


@dataclass(frozen=True)
class SiloSpend:
    """What a query cost one silo, and the silo's budget left after it (epsilon at the
    budget's delta ``budget_delta``; nan from a silo that did not say)."""

    silo: str
    epsilon: float
    delta: float
    budget_left: float = math.nan
    budget_delta: float = math.nan


@dataclass(frozen=True)
class Answer:
    """A query's answer, as the data scientist receives it."""

    query: str
    statistic: str
    cells: tuple[Cell, ...]
    spent: tuple[SiloSpend, ...]
    noise_multiplier: float
    noise_std: dict[str, float] = field(default_factory=dict)
    bins: tuple[float, ...] = ()
    quantiles: tuple[float, ...] = ()
    exact_test_mode: bool = False

    @property
    def value(self) -> float:
        """The single value of a one-cell scalar query (count, sum, mean, var, std).

        Raises:
            ValueError: the answer has one cell per group (read :attr:`groups`), or many
                values (a histogram's :attr:`counts` over :attr:`bins`, quantiles'
                :attr:`values`): one number would silently be the first of them.
        """
        self._one_cell("value")
        if self.statistic in _VECTOR:
            raise ValueError(
                f"a {self.statistic} answer has no single value: read {_VECTOR[self.statistic]}"
            )
        return self.cells[0].value

    @property
    def std_error(self) -> float:
        """The DP noise's standard deviation around :attr:`value` (same cases)."""
        self.value  # noqa: B018 (the same checks)
        return self.cells[0].std_error

    @property
    def values(self) -> tuple[float, ...]:
        """A one-cell histogram's counts (one per bin of :attr:`bins`) or quantiles' estimates
        (one per q of :attr:`quantiles`)."""
        self._one_cell("values")
        if self.statistic not in _VECTOR:
            raise ValueError(f"a {self.statistic} answer has one number: read answer.value")
        return self.cells[0].values

    @property
    def counts(self) -> tuple[float, ...]:
        """A one-cell histogram's noisy counts, one per bin (:meth:`bin_labels`)."""
        if self.statistic != "histogram":
            raise ValueError(f"a {self.statistic} answer has no bins: counts are a histogram's")
        return self.values

    @property
    def groups(self) -> dict[str, Cell]:
        """The cells of a ``group by`` answer, by category (every declared category)."""
        if len(self.cells) == 1 and not self.cells[0].group:
            raise ValueError("this answer has no group by: read answer.value or answer.values")
        return {c.group: c for c in self.cells}

    def cell(self, group: str) -> Cell:
        """The cell of category ``group``."""
        found = self.groups.get(group)
        if found is None:
            raise KeyError(f"no group {group!r}; the groups are {', '.join(self.groups)}")
        return found

    def bin_labels(self) -> tuple[str, ...]:
        """Each histogram bin as an interval. Bin i holds ``bins[i] <= x < bins[i+1]``; the
        end bins are open-ended (values below the first inner edge count in the first bin,
        values at or above the last inner edge in the last), unlike ``numpy.histogram``,
        which drops values outside its edges."""
        edges = [f"{e:g}" for e in self.bins]
        if len(edges) < 2:
            return ()
        if len(edges) == 2:
            return ("all values",)
        inner = [f"[{a}, {b})" for a, b in itertools.pairwise(edges[1:-1])]
        return (f"< {edges[1]}", *inner, f">= {edges[-2]}")

    def _one_cell(self, what: str) -> None:
        if len(self.cells) > 1:
            raise ValueError(
                f"this answer has one cell per group ({', '.join(c.group for c in self.cells)}):"
                f" read answer.groups[GROUP].{'value' if what == 'value' else 'values'} "
                "(or answer.cell(GROUP))"
            )

    def summary(self) -> str:
        """A few human-readable lines: each value with its DP error bar, histogram bins as
        intervals, quantiles by q, the privacy spent and the noise."""
        lines = []
        for c in self.cells:
            name = f"[{c.group}] " if c.group else ""
            if self.statistic == "histogram":
                lines.append(f"{name}histogram (noisy counts per bin):")
                for label, v, e in zip(self.bin_labels(), c.values, c.std_errors, strict=True):
                    lines.append(f"  {label:>20}  {v:10.1f} ± {e:.2g}")
            elif c.values:
                pairs = ", ".join(
                    f"q{q:g}: {v:.4g} ± {e:.2g}"
                    for q, v, e in zip(self.quantiles, c.values, c.std_errors, strict=True)
                )
                lines.append(f"{name}{self.statistic}: {pairs}")
            else:
                lines.append(f"{name}{self.statistic} = {c.value:.6g} ± {c.std_error:.3g}")
        if self.statistic in ("count", "histogram") and not self.exact_test_mode:
            lines.append(
                "counts are noisy (differential privacy): not whole numbers, may be negative; "
                "± is the noise's standard deviation"
            )
        spent = ", ".join(f"{s.silo} ε={s.epsilon:.3g}" for s in self.spent)
        lines.append(f"privacy spent per silo (δ={self.spent[0].delta:g}): {spent}")
        left = ", ".join(
            f"{s.silo} ε={s.budget_left:.3g} (δ={s.budget_delta:g})"
            for s in self.spent
            if not math.isnan(s.budget_left)
        )
        if left:
            lines.append(f"budget left per silo: {left}")
        lines.append(
            f"noise multiplier {self.noise_multiplier:.4g}; noise std "
            + ", ".join(f"{k} {v:.4g}" for k, v in self.noise_std.items())
        )
        if self.exact_test_mode:
            lines.append("WARNING: a silo's operator turned the noise off (test mode): not private")
        return "\n".join(lines)


#: Statistics whose cell holds many values, and where to read them.
_VECTOR = {
    "histogram": "answer.counts (one per bin; answer.bin_labels() and answer.bins give the edges)",
    "quantiles": "answer.values (one per q in answer.quantiles)",
}


def quantiles_from_histogram(
    counts: npt.NDArray[np.float64], edges: npt.NDArray[np.float64], qs: tuple[float, ...]
) -> npt.NDArray[np.float64]:
    """The ``qs`` quantiles of a (noisy) histogram over ``edges``."""
    clean = np.clip(counts, 0.0, None)
    total = clean.sum()
    if total <= 0:
        return np.full(len(qs), (edges[0] + edges[-1]) / 2)
    cdf = np.concatenate([[0.0], np.cumsum(clean)]) / total
    return np.asarray(np.interp(np.asarray(qs), cdf, edges), dtype=np.float64)


def _ratio_cell(
    group: str,
    statistic: str,
    sums: npt.NDArray[np.float64],
    std: npt.NDArray[np.float64],
    center: float,
) -> Cell:
    n = max(float(sums[0]), 1.0)  # a noisy count below 1 is read as 1: the ratio stays finite
    s = float(sums[1])
    sn, ss = float(std[0]), float(std[1])
    m = s / n
    if statistic == "mean":
        se = math.sqrt(ss**2 + (m * sn) ** 2) / n
        return Cell(group, center + m, se, count=float(sums[0]))
    q = float(sums[2])
    sq = float(std[2])
    var = q / n - m * m
    # d var / dQ = 1/N, d var / dS = -2S/N^2, d var / dN = -Q/N^2 + 2 S^2/N^3.
    se = math.sqrt((sq / n) ** 2 + (2 * m * ss / n) ** 2 + ((-q / n + 2 * m * m) * sn / n) ** 2)
    if statistic == "var":
        return Cell(group, var, se, count=float(sums[0]))
    std_value = math.sqrt(max(var, 0.0))
    return Cell(group, std_value, se / (2 * max(std_value, 1e-12)), count=float(sums[0]))


def cells_from_totals(
    layout: Layout,
    totals: npt.NDArray[np.float64],
    std: npt.NDArray[np.float64],
    rng: np.random.Generator | None = None,
) -> tuple[Cell, ...]:
    """The answer's cells from the noisy totals (in the sums' units) and the noise std of
    each."""
    width = len(layout.sums)
    statistic = layout.query.statistic
    cells = []
    for g, group in enumerate(layout.groups):
        part = totals[g * width : (g + 1) * width]
        sd = std[g * width : (g + 1) * width]
        if statistic in ("count", "sum"):
            cells.append(Cell(group, float(part[0]), float(sd[0])))
        elif statistic in ("mean", "var", "std"):
            cells.append(_ratio_cell(group, statistic, part, sd, layout.center))
        elif statistic == "histogram":
            cells.append(Cell(group, values=tuple(part.tolist()), std_errors=tuple(sd.tolist())))
        else:
            edges = np.asarray(layout.edges)
            qs = layout.query.quantiles
            estimate = quantiles_from_histogram(part, edges, qs)
            generator = rng or np.random.default_rng()
            draws = np.stack(
                [
                    quantiles_from_histogram(part + generator.normal(0.0, sd), edges, qs)
                    for _ in range(_BOOTSTRAP)
                ]
            )
            spread = draws.std(axis=0) if float(sd.max(initial=0.0)) > 0 else np.zeros(len(qs))
            cells.append(
                Cell(group, values=tuple(estimate.tolist()), std_errors=tuple(spread.tolist()))
            )
    return tuple(cells)
