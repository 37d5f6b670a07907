"""The ``fed-worker`` command's entry point: the data owner's commands, ``fed-worker requests
...`` (the plan queue) and ``fed-worker ledger`` (the privacy spent), start without importing
the runtime and torch; everything else is the worker."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "owner_command"]


def owner_command(args: Sequence[str]) -> int | None:
    """Run a data owner's command (``requests``, ``ledger``); None when ``args`` is none."""
    if args[:1] == ["requests"]:
        from .requests_cli import requests_main

        return requests_main(args[1:])
    if args[:1] == ["ledger"]:
        from .ledger_cli import ledger_main

        return ledger_main(args[1:])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the data owner's commands to theirs, anything else to the worker's."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = owner_command(args)
    if code is not None:
        return code
    from .cli import main as worker_main

    return worker_main(args)
