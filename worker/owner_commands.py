"""The data owner's commands, ``fed-worker requests ...`` (the plan queue) and ``fed-worker
ledger`` (the privacy spent): dispatched before the worker's runtime (and torch) is imported."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["owner_command"]


def owner_command(args: Sequence[str]) -> int | None:
    """Run a data owner's command (``requests``, ``ledger``, ``audit``); None when ``args`` is
    none of them."""
    if args[:1] == ["requests"]:
        from .requests_cli import requests_main

        return requests_main(args[1:])
    if args[:1] == ["ledger"]:
        from .ledger_cli import ledger_main

        return ledger_main(args[1:])
    if args[:1] == ["audit"]:
        from fedcore.auditlog_cli import audit_main

        return audit_main("fed-worker audit", args[1:])
    return None
