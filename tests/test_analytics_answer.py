"""Issue 27, trap 4: an analytics answer says what it is. ``.value`` refuses to pick the first
of many numbers, histograms print their bins as intervals, counts say they are noisy, an
undeclared category and a lone silo are named as such."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedcore.analytics.answer import Answer, Cell, SiloSpend
from fedcore.analytics.layout import plan_layout
from fedcore.analytics.query import QueryError, parse_query
from fedcore.data.metadata import DatasetMetadata, FeatureInfo
from fedcore.errors import QueryRefusedError
from fedcore.protocol import ANALYTICS_CAPABILITY
from fedcore.server.analytics.frontend import MIN_SILOS, AnalyticsFrontend
from fedcore.server.state.analytics import AnalyticsSettings
from fedcore.server.state.registry import SessionState

SCHEMA = {
    "age": FeatureInfo("age", "float64", minimum=0.0, maximum=100.0),
    "sex": FeatureInfo("sex", "category", categories=("F", "M")),
}
SPENT = (SiloSpend("a", 0.5, 1e-6), SiloSpend("b", 0.5, 1e-6))


def _answer(statistic: str, cells: tuple[Cell, ...], **kw: object) -> Answer:
    return Answer(
        f"{statistic}(age)",
        statistic,
        cells,
        SPENT,
        3.2,
        {"count": 1.6},
        **kw,  # type: ignore[arg-type]
    )


def test_a_scalar_answer_has_a_value() -> None:
    answer = _answer("mean", (Cell("", 51.5, 0.7),))
    assert (answer.value, answer.std_error) == (51.5, 0.7)
    with pytest.raises(ValueError, match="has no group by"):
        answer.groups  # noqa: B018


def test_value_refuses_a_group_by_answer_and_names_groups() -> None:
    answer = _answer("mean", (Cell("F", 50.0, 1.0), Cell("M", 60.0, 1.0)))
    with pytest.raises(ValueError, match=r"one cell per group \(F, M\).*answer.groups"):
        answer.value  # noqa: B018
    assert answer.groups["M"].value == 60.0
    assert answer.cell("F").value == 50.0
    with pytest.raises(KeyError, match="no group 'X'; the groups are F, M"):
        answer.cell("X")


def test_value_refuses_histograms_and_quantiles_and_names_where_to_read() -> None:
    hist = _answer(
        "histogram",
        (Cell("", values=(3.2, 10.9, 5.1), std_errors=(1.6, 1.6, 1.6)),),
        bins=(0.0, 40.0, 60.0, 100.0),
    )
    with pytest.raises(ValueError, match=r"answer.counts .*answer.bin_labels\(\)"):
        hist.value  # noqa: B018
    assert hist.counts == (3.2, 10.9, 5.1)
    quant = _answer(
        "quantiles", (Cell("", values=(41.0, 70.0), std_errors=(2.0, 3.0)),), quantiles=(0.25, 0.75)
    )
    assert math.isnan(quant.cells[0].value)  # what .value returned before
    with pytest.raises(ValueError, match=r"answer.values \(one per q"):
        quant.value  # noqa: B018
    assert quant.values == (41.0, 70.0)
    assert "q0.25: 41 ± 2, q0.75: 70 ± 3" in quant.summary()


def test_histograms_print_labelled_open_ended_bins_and_counts_say_they_are_noisy() -> None:
    hist = _answer(
        "histogram",
        (Cell("", values=(3.2, 10.9, 5.1), std_errors=(1.6, 1.6, 1.6)),),
        bins=(20.0, 40.0, 60.0, 80.0),
    )
    assert hist.bin_labels() == ("< 40", "[40, 60)", ">= 60")
    summary = hist.summary()
    assert "< 40         3.2 ± 1.6" in summary
    assert "[40, 60)        10.9 ± 1.6" in summary
    assert ">= 60         5.1 ± 1.6" in summary
    assert "counts are noisy" in summary
    count = _answer("count", (Cell("", 412.37, 1.6),))
    assert "count = 412.37 ± 1.6" in count.summary()
    assert "counts are noisy" in count.summary()
    assert "counts are noisy" not in _answer("mean", (Cell("", 1.0, 0.1),)).summary()


def test_an_undeclared_category_is_named_not_answered() -> None:
    # Positive control: a declared category plans.
    plan_layout(parse_query('count() where sex == "F"'), SCHEMA)
    with pytest.raises(
        QueryError, match=r"column 'sex' has no category 'female'; its declared categories "
        r"are 'F', 'M'"
    ):  # fmt: skip
        plan_layout(parse_query('count() where sex == "female"'), SCHEMA)


@dataclass
class _Session:
    name: str
    dataset: DatasetMetadata
    state: SessionState = SessionState.IDLE
    capabilities: tuple[str, ...] = field(default=(ANALYTICS_CAPABILITY,))


class _Registry:
    def __init__(self, names: list[str]) -> None:
        data = DatasetMetadata("t", features=tuple(SCHEMA.values()))
        self._sessions = [_Session(n, data) for n in names]

    def sessions(self) -> list[_Session]:
        return self._sessions

    def by_name(self, name: str) -> None:
        raise AssertionError("a lone silo must be refused before any round starts")


async def test_one_silo_is_told_a_query_needs_at_least_two(tmp_path: Path) -> None:
    settings = AnalyticsSettings(tmp_path / "scientists.json")
    lone = AnalyticsFrontend(settings, _Registry(["clinic-0"]))  # type: ignore[arg-type]
    assert MIN_SILOS == 2
    with pytest.raises(QueryRefusedError, match=r"needs at least 2 silos; only 'clinic-0'"):
        await lone.query("count()", epsilon=1.0)
    # Positive control: with two silos the same query gets past the check (to the round).
    pair = AnalyticsFrontend(settings, _Registry(["clinic-0", "clinic-1"]))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="before any round"):
        await pair.query("count()", epsilon=1.0)


def test_the_summary_shows_each_silos_budget_left() -> None:
    spent = (SiloSpend("a", 0.5, 1e-6, 7.25, 1e-5), SiloSpend("b", 0.5, 1e-6))
    answer = Answer("count()", "count", (Cell("", 12.0, 1.0),), spent, 3.2)
    assert "budget left per silo: a ε=7.25 (δ=1e-05)" in answer.summary()
