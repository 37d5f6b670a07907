"""Shipping a model as a plan (``fed-server --ship-plan`` or ``--plan FILE``).

The coordinator exports its configured model (``--model``, built with ``--seed``) or reads a
plan file from ``fed-plan export``, verifies the program exactly as a worker will, and
registers it in this process's model registry under ``plan-<hash>``: the round engine, the
central evaluation and checkpoints then use it like any registered model, and every task
carries the program (``Task.plan``) so workers need neither the code nor ``--model``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from fedcore import plans as plan_api
from fedcore.errors import ConfigError, PlanError, PlanRejectedError
from fedcore.models import (
    available_models,
    build_model,
    import_from_cwd,
    register_model,
    set_weights,
)
from fedcore.plan import ModelSpec
from fedcore.plans import Plan, read_plan_file
from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["add_plan_flags", "plan_from_args", "prepare_plan"]

log = logging.getLogger("fedcore.server")


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "plans (ship the model as a verified program: workers need no code; docs/plans.md)"
    )
    g.add_argument(
        "--ship-plan",
        action="store_true",
        help="export --model with torch.export and send it with every task",
    )
    g.add_argument("--plan", type=Path, metavar="FILE", help="send this plan (fed-plan export)")
    g.add_argument(
        "--plan-input-shape",
        default="1,28,28",
        metavar="C,H,W",
        help="one example's input shape for --ship-plan (default: %(default)s)",
    )


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``."""
    try:
        shape = tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"input shape {text!r} is not a list of integers like 1,28,28") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"input shape {text!r} needs positive dimensions")
    return shape


def prepare_plan(plan: Plan) -> tuple[ModelSpec, pb.PlanProgram]:
    """Verify ``plan`` as workers will and register it; the spec tasks carry and the program."""
    try:
        verified = plan_api.verify_program(plan.program)
    except PlanRejectedError as exc:
        raise ConfigError(f"workers would refuse this plan: {exc}") from None
    weights = dict(plan.weights)

    def factory() -> nn.Module:
        module = verified.build()
        set_weights(module, weights)
        return module

    if verified.model_name not in available_models():
        register_model(verified.model_name)(factory)
    log.info(
        "shipping plan %s (%r)",
        verified.hash,
        plan.program.name,
        extra={"event": "plan_shipped", "plan": verified.hash},
    )
    return ModelSpec(verified.model_name), plan.program


def plan_from_args(
    args: argparse.Namespace, model: ModelSpec, *, seed: int, max_bytes: int
) -> tuple[ModelSpec, pb.PlanProgram] | None:
    """The plan ``--plan`` / ``--ship-plan`` ask for, prepared; None without them."""
    if args.plan is not None and args.ship_plan:
        raise ConfigError("--plan FILE and --ship-plan exclude each other")
    if args.plan is not None:
        try:
            return prepare_plan(read_plan_file(args.plan, max_bytes=max_bytes))
        except PlanError as exc:
            raise ConfigError(str(exc)) from None
    if not args.ship_plan:
        return None
    import_from_cwd()  # the model's own package, where the user runs the command
    module = build_model(model, seed=seed)
    example = torch.zeros((2, *parse_shape(args.plan_input_shape)))
    try:
        plan = plan_api.export_plan(module, example, name=str(model))
    except PlanError as exc:
        raise ConfigError(f"--ship-plan: {exc}") from None
    return prepare_plan(plan)
