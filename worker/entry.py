"""The ``fed-worker`` command's entry point: the data owner's commands (``requests``,
``ledger``, ``audit``: :mod:`.owner_commands`) start without importing the runtime and torch; everything
else is the worker."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .owner_commands import owner_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the data owner's commands (``requests``, ``ledger``, ``audit``) to theirs,
    anything else to the worker's."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = owner_command(args)
    if code is not None:
        return code
    from .cli import main as worker_main

    return worker_main(args)
