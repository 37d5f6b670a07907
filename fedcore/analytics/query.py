"""The query language, and its parser: a tokenizer and a recursive descent, never ``eval``.

::

    query     := statistic "(" arguments ")" [ "where" condition { "and" condition } ]
                 [ "group" "by" COLUMN ]
    statistic := count | sum | mean | var | std | histogram | median | quantile | quantiles
    condition := COLUMN ( ">" | ">=" | "<" | "<=" | "==" | "!=" ) ( NUMBER | STRING )

Examples::

    count()                                   mean(bmi) where age > 60 and sex == "F"
    std(bp) group by sex                      histogram(age, bins=[20, 40, 60, 80])
    histogram(age, bins=8)                    median(bmi)
    quantile(bmi, 0.9)                        quantiles(bmi, [0.25, 0.5, 0.75])

``variance``/``stddev`` are accepted for ``var``/``std``. A query names columns and constants
only: there is no way to ask for a row, and the worker parses the text itself with this same
parser (the coordinator's parse is never trusted).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Literal

from fedcore.errors import ConfigError

__all__ = [
    "MAX_BINS",
    "MAX_CONDITIONS",
    "MAX_QUERY_CHARS",
    "STATISTICS",
    "Condition",
    "Query",
    "QueryError",
    "Statistic",
    "parse_query",
]

Statistic = Literal["count", "sum", "mean", "var", "std", "histogram", "quantiles"]
STATISTICS: tuple[Statistic, ...] = ("count", "sum", "mean", "var", "std", "histogram", "quantiles")
_ALIASES: dict[str, Statistic] = {
    "count": "count",
    "sum": "sum",
    "mean": "mean",
    "avg": "mean",
    "var": "var",
    "variance": "var",
    "std": "std",
    "stddev": "std",
    "histogram": "histogram",
    "median": "quantiles",
    "quantile": "quantiles",
    "quantiles": "quantiles",
}
_OPS = (">=", "<=", "==", "!=", ">", "<")

MAX_QUERY_CHARS = 1000
MAX_CONDITIONS = 8
MAX_BINS = 200
MAX_QUANTILES = 20

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<string>"[^"\\]*"|'[^'\\]*')
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<op>>=|<=|==|!=|>|<)
      | (?P<punct>[()\[\],=*])
    )""",
    re.VERBOSE,
)


class QueryError(ConfigError):
    """A query that does not parse, or does not fit the dataset's schema."""


@dataclass(frozen=True)
class Condition:
    """``column op value``: a number for a numeric column, a string for a categorical one."""

    column: str
    op: str
    value: float | str

    def text(self) -> str:
        value = f'"{self.value}"' if isinstance(self.value, str) else f"{self.value:.17g}"
        return f"{self.column} {self.op} {value}"


@dataclass(frozen=True)
class Query:
    """A parsed query. ``bins`` are histogram edges (or ``num_bins`` equal bins over the
    column's bounds); ``quantiles`` the probabilities of a quantile query."""

    statistic: Statistic
    column: str | None = None
    where: tuple[Condition, ...] = ()
    group_by: str | None = None
    bins: tuple[float, ...] = ()
    num_bins: int = 0
    quantiles: tuple[float, ...] = ()

    def columns(self) -> tuple[str, ...]:
        """Every column the query reads (value, filter and group-by columns)."""
        names = [self.column] if self.column else []
        names += [c.column for c in self.where]
        if self.group_by:
            names.append(self.group_by)
        return tuple(dict.fromkeys(names))

    def text(self) -> str:
        """The canonical text: what travels to the workers, which parse it again."""
        if self.statistic == "count":
            head = "count()"
        elif self.statistic == "histogram":
            bins = (
                "[" + ", ".join(f"{b:.17g}" for b in self.bins) + "]"
                if self.bins
                else str(self.num_bins)
            )
            head = f"histogram({self.column}, bins={bins})"
        elif self.statistic == "quantiles":
            qs = ", ".join(f"{q:.17g}" for q in self.quantiles)
            head = f"quantiles({self.column}, [{qs}])"
        else:
            head = f"{self.statistic}({self.column})"
        if self.where:
            head += " where " + " and ".join(c.text() for c in self.where)
        if self.group_by:
            head += f" group by {self.group_by}"
        return head


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.lastgroup is None:
                snippet = text[pos : pos + 12].strip()
                raise QueryError(f"cannot read the query at {snippet!r} (character {pos + 1})")
            self.items.append((m.lastgroup, m.group(m.lastgroup)))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self) -> tuple[str, str]:
        item = self.peek()
        if item is None:
            raise QueryError(f"the query ends too early: {self.text!r}")
        self.i += 1
        return item

    def expect(self, value: str) -> None:
        _kind, got = self.take()
        if got.lower() != value:
            raise QueryError(f"expected {value!r} in the query, found {got!r}")

    def accept(self, value: str) -> bool:
        item = self.peek()
        if item is not None and item[1].lower() == value:
            self.i += 1
            return True
        return False

    def name(self, what: str) -> str:
        kind, value = self.take()
        if kind != "name":
            raise QueryError(f"expected {what}, found {value!r}")
        return value

    def number(self, what: str) -> float:
        kind, value = self.take()
        if kind != "number":
            raise QueryError(f"expected a number for {what}, found {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise QueryError(f"{what} must be finite, got {value}")
        return number

    def numbers(self, what: str, limit: int) -> tuple[float, ...]:
        self.expect("[")
        values = [self.number(what)]
        while self.accept(","):
            values.append(self.number(what))
        self.expect("]")
        if len(values) > limit:
            raise QueryError(f"at most {limit} values for {what}, got {len(values)}")
        return tuple(values)


def parse_query(text: str) -> Query:
    """Parse ``text``; raises :class:`QueryError` saying what is wrong."""
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text)} characters long, at most {MAX_QUERY_CHARS}")
    tokens = _Tokens(text)
    word = tokens.name("a statistic (count, sum, mean, var, std, histogram, median, quantiles)")
    statistic = _ALIASES.get(word.lower())
    if statistic is None:
        raise QueryError(
            f"unknown statistic {word!r}; use count, sum, mean, var, std, histogram, median, "
            "quantile or quantiles"
        )
    tokens.expect("(")
    query = _arguments(tokens, word.lower(), statistic)
    where: list[Condition] = []
    if tokens.accept("where"):
        where.append(_condition(tokens))
        while tokens.accept("and"):
            where.append(_condition(tokens))
        if len(where) > MAX_CONDITIONS:
            raise QueryError(f"at most {MAX_CONDITIONS} conditions, got {len(where)}")
    group_by = None
    if tokens.accept("group"):
        tokens.expect("by")
        group_by = tokens.name("the group-by column")
    leftover = tokens.peek()
    if leftover is not None:
        raise QueryError(
            f"unexpected {leftover[1]!r} in the query; conditions join with 'and' "
            "('or' is not supported), and 'group by' comes last"
        )
    return Query(
        query.statistic,
        query.column,
        tuple(where),
        group_by,
        query.bins,
        query.num_bins,
        query.quantiles,
    )


def _arguments(tokens: _Tokens, word: str, statistic: Statistic) -> Query:
    if statistic == "count":
        # count(), count(*) and count(column) all count the rows that pass the filter.
        if not tokens.accept(")"):
            if not tokens.accept("*"):
                tokens.name("a column")
            tokens.expect(")")
        return Query("count")
    column = tokens.name("a column name")
    if statistic == "histogram":
        tokens.expect(",")
        if tokens.accept("bins"):
            tokens.expect("=")
        item = tokens.peek()
        if item is not None and item[1] == "[":
            edges = tokens.numbers("the histogram's bin edges", MAX_BINS + 1)
            if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
                raise QueryError("histogram bin edges must be at least 2 increasing numbers")
            tokens.expect(")")
            return Query("histogram", column, bins=edges)
        count = tokens.number("the number of bins")
        if not (count.is_integer() and 1 <= count <= MAX_BINS):
            raise QueryError(f"the number of bins must be a whole number in 1..{MAX_BINS}")
        tokens.expect(")")
        return Query("histogram", column, num_bins=int(count))
    if statistic == "quantiles":
        if word == "median":
            qs: tuple[float, ...] = (0.5,)
        else:
            tokens.expect(",")
            item = tokens.peek()
            if item is not None and item[1] == "[":
                qs = tokens.numbers("the quantiles", MAX_QUANTILES)
            else:
                qs = (tokens.number("the quantile"),)
        if not all(0 <= q <= 1 for q in qs):
            raise QueryError("quantiles are probabilities in [0, 1]")
        tokens.expect(")")
        return Query("quantiles", column, quantiles=qs)
    tokens.expect(")")
    return Query(statistic, column)


def _condition(tokens: _Tokens) -> Condition:
    column = tokens.name("a column in the condition")
    kind, op = tokens.take()
    if op not in _OPS:
        raise QueryError(
            f"expected a comparison ({', '.join(_OPS)}) after {column!r}, found {op!r}"
        )
    kind, raw = tokens.take()
    if kind == "number":
        number = float(raw)
        if not math.isfinite(number):
            raise QueryError(f"the constant compared with {column!r} must be finite")
        value: float | str = number
    elif kind == "string":
        value = raw[1:-1]
    else:
        raise QueryError(
            f"compare {column!r} with a number or a quoted string, found {raw!r} "
            "(columns cannot be compared with columns)"
        )
    return Condition(column, op, value)
