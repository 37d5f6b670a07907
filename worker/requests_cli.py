"""``fed-worker requests list | show | approve | deny``: the data owner decides on plans, and
under ``[jobs] approval = "always"`` on every job and query (``show`` then prints the job, the
scientist and study the coordinator named, and its terms).

The queue is the one the worker's policy names (``[plans] requests``, beside the policy file
by default), or ``--queue DIR``. A request is a plan and the terms it is to run under; it is
named by its id (or its plan's hash, while the plan has one request). ``show`` verifies the
queued program again, here, and prints what it computes with the training config, DP and
secure-aggregation terms it was asked for with; ``approve`` and ``deny`` pin the decision to
the plan's hash *and those terms* (``approve --lr-range LOW:HIGH`` widens the learning rate,
``--rounds N`` bounds the rounds the approval covers). A task under other terms is a new
request. The running worker reads the decision at the plan's next task: no restart.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

# The verifier (sympy, fake tensors: half a second) loads on first use, not with fed-worker.
from fedcore import plans
from fedcore.cli_support import run_cli
from fedcore.errors import ConfigError, PlanRejectedError
from fedcore.plans.queue import PlanRequestRecord, queue_from

__all__ = ["DEFAULT_POLICY", "build_requests_parser", "requests_main"]

#: The policy used when neither --policy nor --queue is given, if the current folder has one.
DEFAULT_POLICY = Path("policy.toml")


def build_requests_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-worker requests",
        description="Review the plans waiting for this worker's data owner, and decide.",
    )
    _add_where(p)
    p.set_defaults(policy=None, queue=None)
    # --policy/--queue before or after the command (`requests list --policy X` too).
    common = argparse.ArgumentParser(add_help=False)
    _add_where(common)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="every plan request and its status")
    show = sub.add_parser(
        "show", parents=[common], help="what a plan computes and how it is to be trained"
    )
    show.add_argument("hash", help="the plan's hash (a unique prefix is enough)")
    approve = sub.add_parser(
        "approve", parents=[common], help="run this plan under these terms (pinned to both)"
    )
    approve.add_argument("hash", help="the request's id (or its plan's hash), a unique prefix")
    approve.add_argument(
        "--lr-range",
        type=_lr_range,
        metavar="LOW:HIGH",
        help="learning rates the approval covers (default: the requested one only)",
    )
    approve.add_argument(
        "--rounds", type=int, help="rounds the approval covers (default: no bound)"
    )
    deny = sub.add_parser(
        "deny", parents=[common], help="refuse this plan; the coordinator is told why"
    )
    deny.add_argument("hash")
    deny.add_argument("--reason", default="", help="sent to the coordinator")
    return p


def _add_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--policy",
        type=Path,
        default=argparse.SUPPRESS,
        help="the worker's policy (names the queue)",
    )
    where.add_argument(
        "--queue", type=Path, default=argparse.SUPPRESS, help="the request queue folder itself"
    )


def _lr_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, got {text!r}") from None


def _run(argv: Sequence[str]) -> None:
    args = build_requests_parser().parse_args(argv)
    if args.policy is not None and args.queue is not None:
        raise ConfigError("give --policy or --queue, not both")
    if args.policy is None and args.queue is None and DEFAULT_POLICY.is_file():
        args.policy = DEFAULT_POLICY  # the data owner runs it beside the worker's policy
    queue = queue_from(args.policy, args.queue)
    if args.command == "list":
        records = queue.list()
        if not records:
            print(f"no plan requests in {queue.root}")
        for record in records:
            print(record.line())
        return
    record = queue.find(args.hash)
    if args.command == "show" and record.job is not None:
        _show_job(record)
        return
    if args.command == "show":
        try:
            verified = plans.verify_program(queue.program(record.hash))
        except PlanRejectedError as exc:
            raise ConfigError(f"the queued plan fails verification here: {exc}") from None
        print(f"request     {record.id[:16]} for plan {record.hash[:16]}")
        print(f"status      {record.status}" + (f" ({record.reason})" if record.reason else ""))
        print(f"requested   for round {record.round} by {record.coordinator[:80]!r}")
        if record.terms.kind == "evaluate":
            print("terms       evaluation only")
        if record.lr_range is not None:
            print(f"approved    learning rates {record.lr_range[0]:g} to {record.lr_range[1]:g}")
        if record.rounds is not None:
            print(f"approved    for {record.rounds} round(s), {record.used} run")
        for line in plans.describe_plan(verified, train=record.train_config, secagg=record.secagg):
            print(line)
        return
    approve = args.command == "approve"
    record = queue.decide(
        record.id,
        approve=approve,
        reason=getattr(args, "reason", ""),  # only deny takes one
        lr_range=args.lr_range if approve else None,
        rounds=args.rounds if approve else None,
    )
    what = record.job.title() if record.job is not None else f"plan {record.hash[:16]}"
    print(
        f"request {record.id[:16]} ({what}) {record.status}"
        + (f": {record.reason}" if record.reason else "")
    )


def _show_job(record: PlanRequestRecord) -> None:
    """A job's request (``[jobs] approval = "always"``): the job, who asked, its terms."""
    job = record.job
    assert job is not None
    print(f"request     {record.id[:16]} for {job.title()}")
    print(f"status      {record.status}" + (f" ({record.reason})" if record.reason else ""))
    print(f"job         {job.job or '(a one-shot federation)'}")
    print(f"scientist   {job.scientist!r} in study {job.study!r} (as the coordinator says)")
    print(f"requested   for round {record.round} by {record.coordinator[:80]!r}")
    if job.query:
        print(f"query       {job.query!r} at epsilon {job.epsilon:g}, delta {job.delta:g}")
        print(f"approved    for {record.rounds or 1} answer(s), {record.used} given")
        return
    print(f"model       {job.model}" + (f" (plan {job.plan[:16]})" if job.plan else ""))
    terms = record.terms
    if terms.train is None:
        print("terms       evaluation only")
    else:
        t = terms.train
        print(
            f"terms       {t.epochs} epoch(s), batch {t.batch_size}, {t.optimizer} at learning "
            f"rate {t.learning_rate:g}, secure aggregation {'on' if terms.secagg else 'off'}"
        )
        for key, value in sorted(t.extra.items()):
            print(f"            {key} = {value:g}")
    if record.rounds is not None:
        print(f"approved    for {record.rounds} round(s), {record.used} run")


def requests_main(argv: Sequence[str]) -> int:
    """Entry point of ``fed-worker requests ...``."""
    return run_cli("fed-worker requests", lambda: _run(argv))
