"""``fed-audit``: run the privacy audit and print its table (see docs/audit.md)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Sequence

from .runner import AuditResult, audit
from .suite import SUITE, Setting, entries

__all__ = ["build_parser", "format_table", "main"]

_EPILOG = """\
exit status: 0 when every honest mechanism stays below its claim and every positive control
is caught, 1 otherwise, 2 on a usage error.

examples:
  fed-audit                          the CI setting (about a minute)
  fed-audit --full --json            every mechanism at full length (about ten CPU-minutes)
  fed-audit --only analytics-count --runs 20000 --seed 7
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-audit",
        description="Empirical privacy audit: run each mechanism as deployed many times on "
        "neighbouring inputs (with and without a canary) and turn the best distinguishing "
        "test into a lower bound on epsilon with Clopper-Pearson confidence. A bound above "
        "the epsilon the code claims is a violation.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--full", action="store_true", help="long runs and every mechanism")
    p.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="audit only NAME (repeat)"
    )
    p.add_argument("--runs", type=int, help="runs on each side for every mechanism audited")
    p.add_argument(
        "--seed", type=int, help="replay an audit (default: fresh entropy, printed with the table)"
    )
    p.add_argument(
        "--confidence", type=float, default=0.95, help="of the lower bounds (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--list", action="store_true", help="list the audited mechanisms and exit")
    return p


def format_table(results: Sequence[AuditResult]) -> str:
    """The audit as an aligned text table."""
    confidence = results[0].confidence if results else 0.95
    head = (
        "mechanism",
        "expect",
        "claimed eps (delta)",
        f"lower bound ({confidence:.0%})",
        "runs",
        "verdict",
    )
    rows = [
        (
            r.name,
            r.expect,
            f"{r.claim.epsilon:.3f} ({r.claim.delta:g})",
            f"{r.lower_bound:.3f}",
            f"{r.runs} x 2",
            r.verdict,
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (head, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        selected = entries(tuple(args.only))
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.runs is not None and args.runs < 2:
        parser.error(f"--runs must be at least 2, got {args.runs}")
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.list:
        for entry in SUITE:
            print(f"{entry.name:32} {entry.expect:8} {entry.build().description}")
        return 0
    setting: Setting = "full" if args.full else "ci"
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    results = []
    for entry in selected:
        runs = args.runs if args.runs is not None else entry.runs(setting)
        if runs is None:
            continue
        results.append(
            audit(
                entry.name,
                entry.build(),
                runs=runs,
                expect=entry.expect,
                seed=seed,
                confidence=args.confidence,
            )
        )
    if args.json:
        print(json.dumps({"seed": seed, "results": [r.to_json() for r in results]}, indent=2))
    else:
        print(format_table(results))
        length = f"--runs {args.runs}" if args.runs is not None else f"{setting} setting"
        print(f"seed {seed} ({length}); replay with --seed {seed}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
