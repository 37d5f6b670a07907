"""The data owner's rules for queries, checked on the worker (pure: no I/O, no data).

Every check here reads the query, the public schema and the silo's own policy, never its
rows: a refusal must say nothing about the data, since refusals are not charged. (An exact
minimum-count rule used to run here on the local counts; its refusals let a data scientist
binary-search a silo's values for free, issue 22. Small cells are now released like any
other, with noise: see docs/analytics.md.)

:func:`check_query` runs before anything is computed: the columns the query reads, the
epsilon and delta it asks for. :func:`check_cost` runs once the noise is calibrated: what
the query costs at the *ledger's* delta, whatever delta the query named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedcore.errors import TaskRefused
from fedcore.policy.model import AnalyticsRules

from .query import Query

__all__ = ["check_cost", "check_query"]


def _refuse(rule: str, reason: str) -> TaskRefused:
    return TaskRefused(rule, reason, by="policy")


def check_query(
    rules: AnalyticsRules | None,
    query: Query,
    *,
    epsilon: float,
    delta: float,
    declared: Sequence[str],
) -> AnalyticsRules:
    """Refuse a query this silo's rules do not allow (raises :class:`TaskRefused`); return
    the rules that admitted it."""
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
    max_delta = rules.max_delta if rules.max_delta is not None else 0.0
    if not 0 < delta <= max_delta:
        raise _refuse(
            "analytics.max-delta",
            f"the query asks for delta {delta:g}; this silo answers with delta in "
            f"(0, {max_delta:g}]",
        )
    return rules


def check_cost(rules: AnalyticsRules, *, epsilon: float, ledger_delta: float) -> None:
    """Refuse a query whose release costs more than ``max-epsilon`` at the ledger's delta
    (``epsilon`` is its cost there). A query naming a large delta buys a small epsilon at
    that delta only; the budget is kept at the ledger's."""
    if not epsilon <= rules.max_epsilon:
        raise _refuse(
            "analytics.max-epsilon",
            f"the query costs epsilon {epsilon:.3g} at this silo's budget delta "
            f"{ledger_delta:g}; it answers with at most {rules.max_epsilon:g} per query",
        )
