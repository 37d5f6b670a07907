"""``fed-query``: a data scientist's command line (see :mod:`fedcore.analytics.client`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from fedcore.errors import FedcoreError

from .client import TOKEN_ENV, connect

__all__ = ["build_parser", "main"]

_EPILOG = f"""\
examples:
  fed-query --server 127.0.0.1:50051 --token-file alice.token --datasets --tag diabetes
  fed-query --server 127.0.0.1:50051 --token-file alice.token --mock hospital-a
  fed-query --server 127.0.0.1:50051 --token-file alice.token "mean(bmi) where age > 60" --epsilon 0.5
  fed-query ... "histogram(age, bins=[20, 40, 60, 80]) group by sex" --epsilon 1 --json

queries: count(), sum(c), mean(c) (or avg), var(c), std(c), histogram(c, bins=N or
[edges]; the end bins are open-ended), median(c), quantile(c, q), quantiles(c, [q1, q2]);
then optionally
"where c1 > 60 and c2 == \\"F\\"" and "group by CATEGORICAL". The token comes from
--token-file or ${TOKEN_ENV} (fed-certs add-scientist).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-query",
        description="Ask a federation of silos a question: search datasets by tag, preview a "
        "silo's mock rows, or run an aggregate query answered under secure aggregation with "
        "differential privacy (each silo spends its own budget).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="?", help='the query, e.g. "mean(bmi) where age > 60"')
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--token-file", type=Path, help="this data scientist's token")
    p.add_argument("--tls-ca", type=Path, help="CA that signed the coordinator's certificate")
    p.add_argument("--tls-server-name", help="name expected in the coordinator's certificate")
    p.add_argument("--insecure", action="store_true", help="allow plaintext to another machine")
    p.add_argument("--epsilon", type=float, help="privacy each silo spends on this query")
    p.add_argument("--delta", type=float, default=0.0, help="(default: the coordinator's)")
    p.add_argument(
        "--tag", action="append", default=[], help="only silos whose dataset has this tag"
    )
    p.add_argument("--datasets", action="store_true", help="list the silos' datasets")
    p.add_argument("--mock", metavar="SILO", help="print the mock rows SILO attached (CSV)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default: %(default)s)")
    return p


def _run(args: argparse.Namespace) -> None:
    with connect(
        args.server,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
        insecure=args.insecure,
        timeout=args.timeout,
    ) as fed:
        if args.datasets:
            for entry in fed.datasets(tag=args.tag):
                mock = " (mock available)" if entry.has_mock else ""
                print(f"{entry.silo}: {entry.dataset.summary()}{mock}")
                for f in entry.dataset.features:
                    extra = (
                        f"categories {', '.join(f.categories)}"
                        if f.is_categorical
                        else f"bounds [{f.minimum}, {f.maximum}]"
                    )
                    print(f"  {f.name} ({f.dtype}) {extra}")
        if args.mock:
            sys.stdout.write(fed.mock_csv(args.mock))
        if args.query:
            if args.epsilon is None:
                raise FedcoreError("a query needs --epsilon (the privacy each silo spends)")
            answer = fed.query(args.query, epsilon=args.epsilon, delta=args.delta, tags=args.tag)
            if args.json:
                print(json.dumps(_finite(asdict(answer)), indent=1))
            else:
                print(answer.summary())


def _finite(value: object) -> object:
    """NaN (a statistic a cell does not have) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.query or args.datasets or args.mock):
        print("fed-query: error: give a query, --datasets or --mock SILO", file=sys.stderr)
        return 2
    try:
        _run(args)
    except FedcoreError as exc:
        print(f"fed-query: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
