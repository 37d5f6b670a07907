"""A silo's exact local sums for a query: computed on the worker, never sent as they are.

Values are clamped to the column's declared bounds first (a record outside them counts as
the nearest bound), which is what bounds the sensitivity. Histogram values outside the
edges fall in the first or last bin (the end bins are open-ended).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcore.data.table import Table

from .layout import Layout
from .query import Condition

__all__ = ["LocalSums", "local_sums"]


@dataclass(frozen=True)
class LocalSums:
    """The exact sums (``layout.words`` of them) and the number of records in each cell."""

    values: npt.NDArray[np.float64]
    cell_counts: npt.NDArray[np.int64]


def _mask(table: Table, condition: Condition) -> npt.NDArray[np.bool_]:
    column = table.column(condition.column)
    value = condition.value
    op = condition.op
    result: npt.NDArray[np.bool_]
    if op == "==":
        result = column == value
    elif op == "!=":
        result = column != value
    elif op == ">":
        result = column > value
    elif op == ">=":
        result = column >= value
    elif op == "<":
        result = column < value
    else:
        result = column <= value
    return np.asarray(result, dtype=bool)


def local_sums(layout: Layout, table: Table) -> LocalSums:
    """The sums ``layout`` describes over the rows of ``table`` that pass the filter."""
    query = layout.query
    keep = np.ones(table.num_rows, dtype=bool)
    for condition in query.where:
        keep &= _mask(table, condition)
    if query.group_by is not None:
        labels = table.column(query.group_by)[keep]
        group_index: npt.NDArray[np.int64] = np.full(labels.shape, -1, dtype=np.int64)
        for i, category in enumerate(layout.groups):
            group_index[labels == category] = i
    else:
        group_index = np.zeros(int(keep.sum()), dtype=np.int64)
    x: npt.NDArray[np.float64] | None = None
    if query.column is not None and layout.bounds is not None:
        lo, hi = layout.bounds
        x = np.clip(table.column(query.column)[keep], lo, hi)
    width = len(layout.sums)
    out = np.zeros((len(layout.groups), width), dtype=np.float64)
    counts = np.zeros(len(layout.groups), dtype=np.int64)
    for g in range(len(layout.groups)):
        in_group = group_index == g
        counts[g] = int(in_group.sum())
        if query.statistic == "count":
            out[g, 0] = counts[g]
            continue
        assert x is not None
        values = x[in_group]
        if query.statistic == "sum":
            out[g, 0] = values.sum()
        elif query.statistic in ("mean", "var", "std"):
            centred = values - layout.center
            out[g, 0] = counts[g]
            out[g, 1] = centred.sum()
            if width == 3:
                out[g, 2] = np.square(centred).sum()
        else:
            edges = np.asarray(layout.edges)
            # Bin i holds edges[i] <= x < edges[i+1]; the last bin also holds its right edge.
            index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, width - 1)
            out[g] = np.bincount(index, minlength=width)[:width]
    return LocalSums(out.reshape(-1), counts)
