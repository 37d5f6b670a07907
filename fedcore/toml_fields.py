"""Strict reading of hand-written TOML files (worker policies, dataset metadata).

A :class:`StrictTable` checks a table's keys against the known ones when it is made, then
hands them out one at a time, typed, so a typo (``max-epoch``) is an error that names the file and the known keys
instead of a rule silently ignored.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fedcore.errors import ConfigError

__all__ = ["StrictTable", "read_toml"]

T = TypeVar("T")


def read_toml(path: Path, error: type[ConfigError], what: str) -> dict[str, Any]:
    """The parsed file, or ``error`` saying why it cannot be read (``what`` names the file)."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


class StrictTable:
    """One TOML table: unknown keys are refused up front, known ones read with their type.

    Args:
        table: the parsed table.
        where: how messages name it (``"policy.toml [models]"``).
        known: every key the table may hold, for the message about an unknown one.
        error: the exception to raise.
    """

    def __init__(
        self, table: dict[str, Any], where: str, known: tuple[str, ...], error: type[ConfigError]
    ) -> None:
        self._table = dict(table)
        self._where = where
        self._known = known
        self._error = error
        unknown = sorted(set(self._table) - set(known))
        if unknown:
            raise error(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(known) or 'none'}"
            )

    def fail(self, key: str, message: str) -> ConfigError:
        """An error about ``key`` (for checks beyond the type)."""
        return self._error(f"{self._where}: {key!r} {message}")

    def _get(self, key: str, check: Callable[[Any], bool], kind: str) -> Any:
        value = self._table.pop(key, None)
        if value is not None and not check(value):
            raise self.fail(key, f"must be {kind}, got {value!r}")
        return value

    def string(self, key: str) -> str | None:
        return self._get(key, lambda v: isinstance(v, str), "a string")  # type: ignore[no-any-return]

    def boolean(self, key: str) -> bool | None:
        return self._get(key, lambda v: isinstance(v, bool), "true or false")  # type: ignore[no-any-return]

    def integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self._get(
            key, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value  # type: ignore[no-any-return]

    def number(self, key: str, *, positive: bool = False) -> float | None:
        value = self._get(
            key,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            "a finite number",
        )
        if value is None:
            return None
        if positive and not value > 0:
            raise self.fail(key, f"must be positive, got {value}")
        return float(value)

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._get(
            key,
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
        )
        return None if value is None else tuple(value)

    def integers(self, key: str, *, minimum: int = 0) -> tuple[int, ...] | None:
        value = self._get(
            key,
            lambda v: (
                isinstance(v, list)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)
            ),
            f"a list of integers >= {minimum}",
        )
        return None if value is None else tuple(value)

    def tables(self, key: str) -> list[dict[str, Any]]:
        value = self._get(
            key,
            lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
            "an array of tables ([[" + key + "]])",
        )
        return [] if value is None else list(value)

    def table(self, key: str) -> dict[str, Any] | None:
        return self._get(key, lambda v: isinstance(v, dict), "a table")  # type: ignore[no-any-return]
