"""The ``fed-worker`` command's entry point: ``fed-worker requests ...`` (the data owner's
plan queue) starts without importing the runtime and torch; everything else is the worker."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``requests`` to the queue's CLI, ``audit`` to the audit log's, anything else
    to the worker's."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["requests"]:
        from .requests_cli import requests_main

        return requests_main(args[1:])
    if args[:1] == ["audit"]:
        from fedcore.auditlog_cli import audit_main

        return audit_main("fed-worker audit", args[1:])
    from .cli import main as worker_main

    return worker_main(args)
