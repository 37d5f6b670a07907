"""Brute force: every query shape's L2 sensitivity under the privacy unit, one row of one silo
replaced (issue 22, item 4). For each shape, every row of a small table is replaced by every
extreme row (values at and past the bounds, in and out of the filter, in every group); the
largest change of the scaled vector must equal the layout's sensitivity: never above it
(that would under-state epsilon), and reached (the bound is tight, and the harness reaches it).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedcore.analytics.layout import plan_layout
from fedcore.analytics.local import local_sums
from fedcore.analytics.query import parse_query
from fedcore.data.metadata import FeatureInfo
from fedcore.data.table import Table
from fedcore.policy.release import REPLACE_ONE_SENSITIVITY, noisy_label_histogram

LO, HI = 10.0, 60.0
AGES = (20.0, 80.0)  # out of / in the filter "age > 50"
GROUPS = ("A", "B")


def _schema(lo: float, hi: float) -> dict[str, FeatureInfo]:
    return {
        "v": FeatureInfo("v", "float64", minimum=lo, maximum=hi),
        "age": FeatureInfo("age", "float64", minimum=0.0, maximum=100.0),
        "g": FeatureInfo("g", "category", categories=GROUPS),
    }


def _rows(lo: float, hi: float) -> list[tuple[float, float, str]]:
    values = (lo - 5, lo, lo + (hi - lo) / 4, (lo + hi) / 2, hi, hi + 5)
    return list(itertools.product(values, AGES, GROUPS))


def _table(rows: list[tuple[float, float, str]]) -> Table:
    v, age, g = zip(*rows, strict=True)
    columns = {"v": np.array(v), "age": np.array(age), "g": np.array(g)}
    return Table(columns, len(rows))


def _largest_change(text: str, lo: float, hi: float) -> tuple[float, float]:
    """(the brute-force largest L2 change of the scaled vector, the layout's sensitivity)."""
    layout = plan_layout(parse_query(text), _schema(lo, hi))
    scale = layout.scale_vector()
    rows = _rows(lo, hi)
    base = local_sums(layout, _table(rows)).values / scale
    largest = 0.0
    for i, replacement in itertools.product(range(len(rows)), rows):
        changed = list(rows)
        changed[i] = replacement
        moved = local_sums(layout, _table(changed)).values / scale - base
        largest = max(largest, float(np.linalg.norm(moved)))
    return largest, layout.sensitivity


SHAPES = [
    ("count() where age > 50", LO, HI, 1.0),
    ("count() where age > 50 group by g", LO, HI, math.sqrt(2)),
    ("sum(v) where age > 50", LO, HI, 1.0),
    ("sum(v) where age > 50", -HI, HI, 2.0),  # lo = -hi: a row flips sign
    ("sum(v) where age > 50 group by g", LO, HI, math.sqrt(2)),
    ("sum(v) where age > 50 group by g", -HI, HI, 2.0),
    ("mean(v) where age > 50", LO, HI, 2.0),
    ("mean(v) where age > 50 group by g", LO, HI, 2.0),
    ("var(v) where age > 50", LO, HI, 2.0),
    ("std(v) where age > 50 group by g", LO, HI, math.sqrt(6)),
    ("histogram(v, bins=4) where age > 50", LO, HI, math.sqrt(2)),
    ("histogram(v, bins=[20, 40]) where age > 50 group by g", LO, HI, math.sqrt(2)),
    ("median(v) where age > 50", LO, HI, math.sqrt(2)),
    ("quantiles(v, [0.1, 0.9]) where age > 50 group by g", LO, HI, math.sqrt(2)),
]


@pytest.mark.parametrize(("text", "lo", "hi", "expected"), SHAPES)
def test_every_query_shapes_sensitivity_is_its_brute_force_maximum(
    text: str, lo: float, hi: float, expected: float
) -> None:
    largest, sensitivity = _largest_change(text, lo, hi)
    assert sensitivity == pytest.approx(expected)
    assert largest <= sensitivity + 1e-9, "the layout under-states the sensitivity"
    assert largest == pytest.approx(sensitivity), "the bound is not reached: harness or bound"


def test_the_label_histograms_charge_is_for_one_record_replaced() -> None:
    labels = np.array([0, 1, 2, 2, 3, 9])
    base = np.bincount(labels, minlength=10)
    largest = 0.0
    for i, new in itertools.product(range(len(labels)), range(-1, 11)):  # -1, 10: not counted
        changed = labels.copy()
        changed[i] = new
        kept = changed[(changed >= 0) & (changed < 10)]
        largest = max(largest, float(np.linalg.norm(np.bincount(kept, minlength=10) - base)))
    assert largest == pytest.approx(REPLACE_ONE_SENSITIVITY)
    _, charge = noisy_label_histogram(labels, num_labels=10, noise_multiplier=20.0)
    assert charge.noise_multiplier == pytest.approx(20.0 / largest)
