"""Shared command-line plumbing: TOML config files, logging set-up, error exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError, FedcoreError

__all__ = [
    "add_common_flags",
    "configure_logging",
    "parse_args_with_config",
    "run_cli",
]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--log-level``, ``--quiet`` and ``--log-json`` for every command."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="read settings from a TOML file: keys are the long flag names (dashes or "
        "underscores); a table [NAME] sets --NAME from its 'name' key and --NAME-options "
        "from the others (e.g. [strategy]); flags given on the command line win",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="only log warnings and errors")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults that flags override."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    try:
        with args.config.open("rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {args.config}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {args.config} is not valid TOML: {exc}") from None
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict) and f"{dest}_options" in known:
            # [strategy] name = "fedadam", server-lr = 0.1 -> --strategy, --strategy-options
            options = dict(value)
            if "name" in options:
                defaults[dest] = options.pop("name")
            defaults[f"{dest}_options"] = options
            continue
        action = known.get(dest)
        if action is None:
            raise ConfigError(
                f"config file {args.config}: unknown setting {key!r}; "
                f"known settings: {', '.join(sorted(k.replace('_', '-') for k in known))}"
            )
        if action.type is not None and not isinstance(value, bool | list | dict):
            try:
                value = action.type(value)  # type: ignore[operator]
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"config file {args.config}: bad value for {key!r}: {exc}"
                ) from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(
                f"config file {args.config}: {key!r} must be one of {list(action.choices)}"
            )
        defaults[dest] = value
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


#: What every LogRecord carries; anything else on a record came from a log call's ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the structured fields a
    log call passed with ``extra=`` (``event`` names what happened, e.g. ``{"event":
    "round_started", "round": 2, "workers": 3}``): what scripts and tests wait on, so a
    reworded message breaks nothing."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record is emitted, not when the handler was
    made: a command run in-process (tests, notebooks) must not leave the root logger writing
    to a stream that its caller has since replaced or closed."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(args: argparse.Namespace, prefix: str) -> None:
    """Log to stderr at the level the flags ask for."""
    level = logging.WARNING if args.quiet else getattr(logging, args.log_level)
    handler = _StderrHandler()
    if args.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("fedcore").setLevel(level)


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """Run a command's body; a fedcore error becomes ``PROG: error: ...`` and exit 2 (no
    traceback), Ctrl-C exit 130, success exit 0."""
    try:
        body()
    except FedcoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
