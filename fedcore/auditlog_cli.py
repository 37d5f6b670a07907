"""``fed-worker audit verify FILE`` and ``fed-server audit verify FILE``: check an audit
log's hash chain (:mod:`fedcore.auditlog`). Exit 0 when intact, 1 at the first bad line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .auditlog import verify

__all__ = ["audit_main"]


def audit_main(prog: str, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Check a hash-chained audit log.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every entry's hash and its link to the previous")
    check.add_argument("log", type=Path, help="the audit log (JSON lines)")
    args = parser.parse_args(list(argv))
    try:
        count, problem = verify(args.log)
    except OSError as exc:
        print(f"{prog}: error: cannot read {args.log}: {exc.strerror}")
        return 2
    if problem is not None:
        print(f"{args.log}: TAMPERED at {problem} ({count} entries before it verify)")
        return 1
    print(f"{args.log}: {count} entries, chain intact")
    return 0
