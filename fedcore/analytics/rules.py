"""The data owner's rules for queries, checked on the worker (pure: no I/O).

:func:`check_query` runs before anything is computed: the columns the query reads, the
epsilon and delta it asks for. :func:`check_min_count` runs on the exact local counts: a
silo with fewer than ``min-count`` records in any released cell refuses the whole query (the
cell is suppressed; the refusal names it so the data scientist can drop or merge it). That
refusal is itself a one-bit, un-noised release about the silo's data, the usual price of a
minimum-count rule (NVIDIA FLARE's cleansers pay it too); docs/analytics.md says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fedcore.errors import TaskRefused
from fedcore.policy.model import AnalyticsRules

from .layout import Layout
from .query import Query

__all__ = ["check_min_count", "check_query"]


def _refuse(rule: str, reason: str) -> TaskRefused:
    return TaskRefused(rule, reason, by="policy")


def check_query(
    rules: AnalyticsRules | None,
    query: Query,
    *,
    epsilon: float,
    delta: float,
    declared: Sequence[str],
) -> None:
    """Refuse a query this silo's rules do not allow (raises :class:`TaskRefused`)."""
    if rules is None:
        raise _refuse(
            "analytics",
            "this silo's policy has no [analytics] section: it answers no queries",
        )
    allowed = rules.allowed_columns if rules.allowed_columns is not None else tuple(declared)
    forbidden = [c for c in query.columns() if c not in allowed]
    if forbidden:
        raise _refuse(
            "analytics.allowed-columns",
            f"the query reads column(s) {', '.join(forbidden)}; this silo allows only "
            f"{', '.join(allowed) or 'none'}",
        )
    if not (math.isfinite(epsilon) and 0 < epsilon <= rules.max_epsilon):
        raise _refuse(
            "analytics.max-epsilon",
            f"the query asks for epsilon {epsilon:g}; this silo answers with at most "
            f"{rules.max_epsilon:g} per query",
        )
    if not 0 < delta < 1:
        raise _refuse("analytics.delta", f"delta must be in (0, 1), got {delta:g}")


def check_min_count(
    rules: AnalyticsRules, layout: Layout, cell_counts: npt.NDArray[np.int64]
) -> None:
    """Refuse when a released cell holds fewer than ``min-count`` local records."""
    for group, count in zip(layout.groups, cell_counts.tolist(), strict=True):
        if count < rules.min_count:
            cell = f"group {layout.query.group_by} == {group!r}" if group else "the filtered table"
            raise _refuse(
                "analytics.min-count",
                f"{cell} holds fewer than {rules.min_count} records on this silo; suppressed. "
                "Widen the filter or group by something coarser",
            )
