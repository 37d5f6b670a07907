"""Settings declared once: a dataclass field holds its default and its help, and the command
line's flags are built from it (``fed-server``'s settings, ``server/state/config.py``).

    @dataclass
    class Limits:
        round_timeout: float = setting(600.0, "seconds a round waits for results")

    add_flags(parser.add_argument_group("timeouts"), Limits)  # --round-timeout
    Limits(**flag_values(Limits, args))

A field without :func:`setting` has no flag. The flag is ``--`` and the field's name with
dashes unless ``flag`` names another; its value lands where argparse puts the flag's (so a
``--config`` TOML names it like the flag: ``require-tag`` for ``--require-tag``). A ``bool``
field is a switch (``store_true``), an optional field takes its type, a ``tuple[str, ...]``
field is a repeatable flag, a ``Literal[...]`` field takes one of its values. The help ends
with the default, read from the field. A required field takes its flag's help as
``field(metadata=setting_metadata(help, ...))`` (a ``dataclasses.field`` call, so type checkers
see it has no default): its flag is optional, absent reads as None, and the caller decides what
that means (usually: the group is off, as without ``--scientists``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "FlagGroup",
    "add_flags",
    "flag_default",
    "flag_dest",
    "flag_fields",
    "flag_name",
    "flag_values",
    "setting",
    "setting_metadata",
]

_SCALARS: dict[Any, type] = {int: int, float: float, str: str, Path: Path}


class FlagGroup(Protocol):
    """Where flags go: an ``argparse`` parser or one of its argument groups."""

    def add_argument(self, *names: str, **options: Any) -> object: ...


def setting_metadata(
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    show_default: bool = True,
) -> dict[str, Any]:
    """A field's flag, as ``dataclasses.field`` metadata (see the module's docstring)."""
    return {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "choices": choices,
        "show_default": show_default,
    }


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    show_default: bool = True,
) -> Any:
    """A dataclass field with its default and its flag's help (see the module's docstring)."""
    metadata = setting_metadata(
        help, flag=flag, metavar=metavar, choices=choices, show_default=show_default
    )
    return dataclasses.field(default=default, metadata=metadata)


def flag_default(field: dataclasses.Field[Any]) -> Any:
    """The value of ``field``'s flag when it is not given (None for a required field)."""
    return None if field.default is dataclasses.MISSING else field.default


def flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` that have a flag."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(field: dataclasses.Field[Any]) -> str:
    """The flag of ``field`` (``--round-timeout`` for ``round_timeout``)."""
    return str(field.metadata["flag"] or "--" + field.name.replace("_", "-"))


def flag_dest(field: dataclasses.Field[Any]) -> str:
    """Where argparse puts the value of ``field``'s flag (``require_tag`` for ``--require-tag``)."""
    return flag_name(field).removeprefix("--").replace("-", "_")


def _kind(hint: Any) -> tuple[str, type | None, tuple[str, ...] | None]:
    """("switch" | "list" | "value", the value's type, its choices) for a field's type hint."""
    if hint is bool:
        return "switch", None, None
    if hint in _SCALARS:
        return "value", _SCALARS[hint], None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal and all(isinstance(a, str) for a in args):
        return "value", str, args
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _kind(inner)
    if typing.get_origin(hint) is tuple and args == (str, ...):
        return "list", str, None
    raise TypeError(f"no flag for a field of type {hint!r}")


def add_flags(group: FlagGroup, cls: type, *, only: Sequence[str] | None = None) -> None:
    """Add a flag to ``group`` for every field of ``cls`` that has one (those named in
    ``only``, in that order, when given)."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in flag_fields(cls)}
    for name in only if only is not None else list(by_name):
        field = by_name[name]
        kind, value_type, literal = _kind(hints[field.name])
        meta = field.metadata
        text = str(meta["help"])
        if kind == "switch":
            group.add_argument(flag_name(field), action="store_true", help=text)
            continue
        default = flag_default(field)
        if meta["show_default"] and default not in (None, ()):
            text += " (default: %(default)s)"
        options: dict[str, Any] = {"help": text, "type": value_type}
        if meta["metavar"] is not None:
            options["metavar"] = meta["metavar"]
        # Explicit choices fix the order --help lists them in; a Literal's are its values.
        choices = meta["choices"] if meta["choices"] is not None else literal
        if choices is not None:
            options["choices"] = list(choices)
        if kind == "list":
            # argparse appends to its default: a fresh list, made a tuple by flag_values.
            group.add_argument(flag_name(field), action="append", default=[], **options)
        else:
            group.add_argument(flag_name(field), default=default, **options)


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``cls``'s flags in ``args``, by field name (lists as tuples)."""
    values: dict[str, Any] = {}
    for field in flag_fields(cls):
        value = getattr(args, flag_dest(field))
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return values
