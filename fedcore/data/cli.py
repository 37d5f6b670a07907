"""``fed-data``: split MNIST into worker shards, and verify the bundled files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcore.data.mnist import BUNDLED_MNIST_DIR, load_mnist, verify_checksums
from fedcore.data.partition import format_summary, partition, summarize
from fedcore.data.shards import save_shard
from fedcore.errors import ConfigError, DataError, FedcoreError

__all__ = ["build_parser", "main"]

PROG = "fed-data"
_DEFAULT_ALPHA = 0.5
_DEFAULT_CLASSES = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fed-data`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "split":
            return _split(args)
        return _verify(args)
    except FedcoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fed-data``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Prepare federated datasets: split MNIST into one shard per worker, "
        "and check the bundled MNIST files against their checksums.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    split = sub.add_parser(
        "split",
        help="split MNIST train into worker shards",
        description="Load the MNIST training split, partition it into N disjoint shards and "
        "write DIR/shard-0.npz ... DIR/shard-{N-1}.npz (arrays x, y) plus DIR/test.npz (the "
        "MNIST test split). Prints a table of examples per shard and class.",
    )
    split.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory to write the shards into (created if missing)",
    )
    split.add_argument(
        "--num-shards",
        required=True,
        type=_positive_int,
        metavar="N",
        help="number of shards, one per worker",
    )
    split.add_argument(
        "--scheme",
        choices=["iid", "dirichlet", "shards"],
        default="iid",
        help="iid: uniform random; dirichlet: per-class proportions drawn "
        "from Dir(alpha); shards: McMahan's pathological split, each shard "
        "gets --classes-per-shard label-sorted pieces (default: %(default)s)",
    )
    split.add_argument(
        "--alpha",
        type=_positive_float,
        metavar="A",
        help=f"Dirichlet concentration; smaller is more skewed (dirichlet only; "
        f"default: {_DEFAULT_ALPHA})",
    )
    split.add_argument(
        "--classes-per-shard",
        type=_positive_int,
        metavar="K",
        help=f"most classes a shard may hold (shards only; default: {_DEFAULT_CLASSES})",
    )
    split.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed; the same seed gives the same shards (default: %(default)s)",
    )
    split.add_argument(
        "--source",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the MNIST IDX files (default: the bundled copy)",
    )
    split.add_argument(
        "--max-examples",
        type=_positive_int,
        default=None,
        metavar="M",
        help="use only the first M training examples (handy for quick tests)",
    )

    verify = sub.add_parser(
        "verify",
        help="check MNIST files against SHA256SUMS",
        description="Check every file listed in ROOT/SHA256SUMS against its sha256 digest. "
        "Prints OK, or the first mismatch and exits with status 1.",
    )
    verify.add_argument(
        "--root",
        type=Path,
        default=BUNDLED_MNIST_DIR,
        metavar="DIR",
        help="folder holding SHA256SUMS (default: the bundled MNIST copy)",
    )
    return parser


def _scheme_options(args: argparse.Namespace) -> tuple[float, int]:
    """--alpha and --classes-per-shard; each belongs to one scheme, and is refused with
    another rather than silently ignored."""
    for flag, value, scheme in (
        ("--alpha", args.alpha, "dirichlet"),
        ("--classes-per-shard", args.classes_per_shard, "shards"),
    ):
        if value is not None and args.scheme != scheme:
            raise ConfigError(
                f"{flag} applies to --scheme {scheme} only, not --scheme {args.scheme}; "
                f"drop {flag} or pass --scheme {scheme}"
            )
    alpha = args.alpha if args.alpha is not None else _DEFAULT_ALPHA
    classes = args.classes_per_shard if args.classes_per_shard is not None else _DEFAULT_CLASSES
    return alpha, classes


def _split(args: argparse.Namespace) -> int:
    alpha, classes_per_shard = _scheme_options(args)
    x, y = load_mnist("train", root=args.source)
    if args.max_examples is not None:
        x, y = x[: args.max_examples], y[: args.max_examples]
    parts = partition(
        y,
        args.num_shards,
        args.scheme,
        seed=args.seed,
        alpha=alpha,
        classes_per_shard=classes_per_shard,
    )
    out: Path = args.out
    written = [save_shard(out / f"shard-{i}.npz", x[idx], y[idx]) for i, idx in enumerate(parts)]
    x_test, y_test = load_mnist("test", root=args.source)
    written.append(save_shard(out / "test.npz", x_test, y_test))
    print(format_summary(summarize(y, parts)))
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    root: Path = args.root
    try:
        verify_checksums(root)
    except DataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"OK: every file listed in {root / 'SHA256SUMS'} matches its checksum")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
