"""What a query releases: a fixed vector of sums, its cells, and each sum's sensitivity.

The vector's shape depends only on the query and the *public* schema (bounds, categories),
never on the data, so its length reveals nothing. Per cell (the whole table, or each public
category of the group-by column):

==============  ==========================================  =============================
statistic       sums released per cell                       scale of each sum
==============  ==========================================  =============================
count           n                                            1
sum             sum(x)                                       max(|lo|, |hi|)
mean            n, sum(x - c)                                1, w/2
var, std        n, sum(x - c), sum((x - c)^2)                1, w/2, (w/2)^2
histogram       one count per bin                            1 (a record is in one bin)
quantiles       one count per bin of a fine histogram        1
==============  ==========================================  =============================

with ``x`` clamped to the column's bounds ``[lo, hi]``, ``w = hi - lo`` and ``c`` their
midpoint (centring halves the sums' range). Each sum is divided by its scale, so one
record moves each scaled sum of its cell by at most 1.

**The privacy unit is one row of one silo, replaced** (issue 22). A silo's row count is
public (its hello advertises it, as for training), so the neighbouring tables are those
that differ in the *value* of one row: adding or removing a row would change a public
number. :attr:`Layout.sensitivity` is the L2 sensitivity of the scaled vector under that
relation, the largest of three cases: the row stays in its cell with other values
(``same``), it enters or leaves the filter (``in/out``, as adding or removing), or it moves
to another group (``cross``, two cells change):

==============  ========  ========  ========  =========================
statistic       same      in/out    cross     sensitivity
==============  ========  ========  ========  =========================
count           0         1         √2        1, √2 with group-by
sum             w/s       1         √2        max(w/s, 1 or √2),  s = max(|lo|, |hi|)
mean            2         √2        2         2
var, std        2         √3        √6        2, √6 with group-by
histogram       √2        1         √2        √2
quantiles       √2        1         √2        √2
==============  ========  ========  ========  =========================

(for a variance, the same-cell change ``(0, u - v, u² - v²)`` with ``u, v`` in [-1, 1] has
squared norm ``(u - v)² (1 + (u + v)²) <= 4``). tests/test_analytics_sensitivity.py checks
every row of this table by brute force over extreme replacements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.data.metadata import FeatureInfo

from .query import Query, QueryError

__all__ = ["QUANTILE_BINS", "Layout", "plan_layout"]

#: Bins of the DP histogram that quantiles are read from (equal width over the bounds).
QUANTILE_BINS = 64
_ROOT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Layout:
    """The released vector of one query: ``len(groups) * len(sums)`` words, cell-major."""

    query: Query
    groups: tuple[str, ...]
    sums: tuple[str, ...]
    sensitivities: tuple[float, ...]
    sensitivity: float
    bounds: tuple[float, float] | None
    edges: tuple[float, ...] = ()

    @property
    def words(self) -> int:
        return len(self.groups) * len(self.sums)

    @property
    def center(self) -> float:
        if self.bounds is None:
            return 0.0
        return (self.bounds[0] + self.bounds[1]) / 2

    def scale_vector(self) -> np.ndarray:
        """Each word's sensitivity, for the whole vector."""
        return np.tile(np.asarray(self.sensitivities, dtype=np.float64), len(self.groups))


def _feature(schema: Mapping[str, FeatureInfo], name: str, role: str) -> FeatureInfo:
    feature = schema.get(name)
    if feature is None:
        raise QueryError(
            f"the dataset has no column {name!r} (used as {role}); its columns are "
            f"{', '.join(schema) or 'none'}"
        )
    return feature


def _numeric(schema: Mapping[str, FeatureInfo], name: str, role: str) -> tuple[float, float]:
    feature = _feature(schema, name, role)
    if feature.is_categorical:
        raise QueryError(f"column {name!r} is categorical; {role} needs a numeric column")
    bounds = feature.bounds
    if bounds is None:
        raise QueryError(
            f"column {name!r} has no public bounds (minimum/maximum in the dataset's metadata); "
            "without them a query's sensitivity is unbounded"
        )
    return bounds


def plan_layout(query: Query, schema: Mapping[str, FeatureInfo]) -> Layout:
    """Check ``query`` against the public schema and lay out what it releases.

    Raises:
        QueryError: an unknown column, a statistic of a categorical column, a comparison of
            the wrong type, or a group-by column that is not categorical.
    """
    for condition in query.where:
        feature = _feature(schema, condition.column, "a filter")
        if feature.is_categorical:
            if not isinstance(condition.value, str) or condition.op not in ("==", "!="):
                raise QueryError(
                    f"categorical column {condition.column!r} compares with == or != and a "
                    f'quoted category, e.g. {condition.column} == "{feature.categories[0]}"'
                )
            if condition.value not in feature.categories:
                # The categories are public metadata: naming them releases nothing.
                raise QueryError(
                    f"column {condition.column!r} has no category {condition.value!r}; its "
                    f"declared categories are {', '.join(repr(c) for c in feature.categories)}"
                )
        elif isinstance(condition.value, str):
            raise QueryError(f"numeric column {condition.column!r} compares with a number")
    groups: tuple[str, ...] = ("",)
    if query.group_by is not None:
        feature = _feature(schema, query.group_by, "the group-by column")
        if not feature.is_categorical:
            raise QueryError(
                f"group by needs a categorical column with public categories; "
                f"{query.group_by!r} is {feature.dtype or 'numeric'}"
            )
        groups = feature.categories
    s = query.statistic
    cross = len(groups) > 1  # a replaced row may move to another cell
    if s == "count":
        return Layout(query, groups, ("count",), (1.0,), _ROOT2 if cross else 1.0, None)
    assert query.column is not None  # the parser requires one for every other statistic
    lo, hi = _numeric(schema, query.column, f"{s}()")
    half = (hi - lo) / 2
    if s == "sum":
        scale = max(abs(lo), abs(hi))
        moved = _ROOT2 if cross else 1.0
        return Layout(query, groups, ("sum",), (scale,), max((hi - lo) / scale, moved), (lo, hi))
    if s == "mean":
        return Layout(query, groups, ("count", "sum"), (1.0, half), 2.0, (lo, hi))
    if s in ("var", "std"):
        sensitivity = math.sqrt(6.0) if cross else 2.0
        scales = (1.0, half, half * half)
        return Layout(query, groups, ("count", "sum", "squares"), scales, sensitivity, (lo, hi))
    if s == "histogram":
        edges = query.bins or tuple(np.linspace(lo, hi, query.num_bins + 1).tolist())
    else:
        edges = tuple(np.linspace(lo, hi, QUANTILE_BINS + 1).tolist())
    names = tuple(f"bin{i}" for i in range(len(edges) - 1))
    sensitivity = _ROOT2 if (cross or len(names) > 1) else 1.0
    return Layout(query, groups, names, (1.0,) * len(names), sensitivity, (lo, hi), edges)
