"""``fed-plan``: export a model as a plan, and show what a plan does.

``fed-plan export pkg.mod:factory --out model.plan`` runs on the data scientist's machine (it
imports the factory: local code, local trust). ``fed-plan show model.plan`` (or a hash from a
worker's request queue, with ``--policy`` or ``--queue``) verifies the plan as a worker would
and prints what it computes, in words a data owner can judge.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fedcore.cli_support import run_cli
from fedcore.errors import ConfigError, PlanError, PlanRejectedError
from fedcore.losses import LOSSES
from fedcore.models import build_model, import_from_cwd
from fedcore.plan import ModelSpec
from fedcore.protocol import DEFAULT_MAX_MODEL_BYTES

from .describe import describe_plan
from .export import export_plan
from .format import read_plan_file, write_plan_file
from .load import VerifiedPlan, verify_program
from .queue import queue_from

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  fed-plan export examples.plan_resnet:make_model --params '{"width": 16}' --out resnet.plan
  fed-plan export mnist-cnn --out cnn.plan
  fed-plan show resnet.plan
  fed-plan show 3f2a9c --policy policy.toml     # a plan waiting in a worker's request queue
  fed-server --plan resnet.plan ...             # ship it; workers need no code

See docs/plans.md for what a plan may contain and how data owners approve plans.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-plan",
        description="Export a PyTorch model as a verifiable plan, or show what a plan does.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export a model (registered name or pkg.mod:factory)")
    e.add_argument("model", help="a registered model name or package.module:factory")
    e.add_argument("--params", default="{}", metavar="JSON", help="factory keyword arguments")
    e.add_argument("--out", type=Path, required=True, help="the plan file to write")
    e.add_argument(
        "--input-shape", default="1,28,28", metavar="C,H,W", help="one example's input shape"
    )
    e.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES))
    e.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    e.add_argument("--name", default="", help="the plan's name (default: the model's)")
    s = sub.add_parser("show", help="what a plan computes (a file, or a hash in a queue)")
    s.add_argument("plan", help="a plan file, or a plan hash (prefix) in a request queue")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--policy", type=Path, help="the worker policy naming the request queue")
    where.add_argument("--queue", type=Path, help="a worker's request queue folder")
    return p


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not a list of integers") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape {text!r} needs positive dimensions")
    return shape


def _export(args: argparse.Namespace) -> None:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError("--params must be a JSON object")
    spec = ModelSpec(args.model, params)
    import_from_cwd()
    module = build_model(spec, seed=args.seed)
    plan = export_plan(
        module,
        torch.zeros((2, *_shape(args.input_shape))),
        loss=args.loss,
        name=args.name or str(spec),
    )
    write_plan_file(plan, args.out)
    print(f"wrote {args.out}: plan {plan.hash}")
    for line in describe_plan(verify_program(plan.program)):
        print(line)


def _load_for_show(args: argparse.Namespace) -> VerifiedPlan:
    path = Path(args.plan)
    if path.is_file():
        plan = read_plan_file(path, max_bytes=4 * DEFAULT_MAX_MODEL_BYTES)
        return verify_program(plan.program)
    # A hash: look it up in a worker's request queue.
    queue = queue_from(args.policy, args.queue)
    record = queue.find(args.plan)
    return verify_program(queue.program(record.hash))


def _show(args: argparse.Namespace) -> None:
    try:
        verified = _load_for_show(args)
    except PlanRejectedError as exc:
        raise PlanError(f"a worker would refuse this plan: {exc}") from None
    for line in describe_plan(verified):
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        args = build_parser().parse_args(argv)
        if args.command == "export":
            _export(args)
        else:
            _show(args)

    return run_cli("fed-plan", body)


if __name__ == "__main__":
    sys.exit(main())
