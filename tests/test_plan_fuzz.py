"""Adversarial fuzzing of the plan verifier (hypothesis): mutations of a valid plan either are
refused with a PlanRejectedError or build into a program that keeps the rules; any text is
parsed by the shape grammar or refused, never evaluated.

The mutations are an attacker's moves: operators swapped (in-place ones, uninitialised
allocations, views), sizes changed, a node's input replaced by the batch, a parameter or a
buffer (aliasing), declared shapes changed, names given control characters. For a program
that verifies, one training-mode forward pass on real tensors must leave the input and the
parameters untouched, change no buffer but the accepted updates, return the declared
shape, and describe must print nothing unescaped.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_attacks import raw_program
from torch import nn

from fedcore.errors import PlanRejectedError
from fedcore.plans import Limits, describe_plan, plan_hash, verify_program
from fedcore.plans.shape_expr import Expr, parse_expression
from fedcore.v1 import fedcore_pb2 as pb

LIMITS = Limits(max_activation_bytes=64 << 20)  # a plan that verifies is cheap to run
SWAPS = [
    "torch.ops.aten.add_.Tensor",
    "torch.ops.aten.mul_.Tensor",
    "torch.ops.aten.copy_.default",
    "torch.ops.aten.relu_.default",
    "torch.ops.aten.zero_.default",
    "torch.ops.aten.fill_.Scalar",
    "torch.ops.aten.detach_.default",
    "torch.ops.aten.empty_like.default",
    "torch.ops.aten.full.default",
    "torch.ops.aten.expand.default",
    "torch.ops.aten.repeat.default",
    "torch.ops.aten.t.default",
    "torch.ops.aten.add.Tensor",
    "torch.ops.aten.batch_norm.default",
]
HOSTILE_TEXT = st.lists(
    st.sampled_from(["\x1b", "[2K", "\r", "\n", "\u202e", "a", ".", "(reviewed: SAFE)", " "]),
    min_size=1,
    max_size=6,
).map("".join)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 9 * 9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.bn(self.conv(x)))
        return self.fc(h.flatten(1)) + torch.zeros(10)  # type: ignore[no-any-return]


@functools.cache
def _base() -> tuple[bytes, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module = _Net()
    program = raw_program(module, torch.zeros(2, 1, 28, 28))
    weights = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return program.SerializeToString(), weights


def _doc() -> tuple[pb.PlanProgram, dict[str, Any]]:
    program = pb.PlanProgram()
    program.ParseFromString(_base()[0])
    return program, json.loads(program.train_graph)


def _nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["graph_module"]["graph"]["nodes"]  # type: ignore[no-any-return]


@st.composite
def _mutation(draw: st.DrawFn) -> tuple[str, Any]:
    _, doc = _doc()
    nodes = _nodes(doc)
    index = draw(st.integers(0, len(nodes) - 1))
    kind = draw(st.sampled_from(["swap", "size", "alias", "declared", "name"]))
    if kind == "swap":
        return kind, (index, draw(st.sampled_from(SWAPS)))
    if kind == "size":
        return kind, (index, draw(st.integers(0, 1 << 60)))
    if kind == "alias":
        specs = doc["graph_module"]["signature"]["input_specs"]
        names = [next(iter(s.values()))["arg"].get("name") for s in specs]
        names = [n or "x" for n in names]
        return kind, (index, draw(st.sampled_from(names)))
    if kind == "declared":
        tensors = sorted(doc["graph_module"]["graph"]["tensor_values"])
        return kind, (draw(st.sampled_from(tensors)), draw(st.integers(0, 1 << 40)))
    return kind, (index, draw(HOSTILE_TEXT))


def _apply(doc: dict[str, Any], kind: str, detail: Any) -> None:
    nodes = _nodes(doc)
    if kind == "swap":
        index, target = detail
        nodes[index]["target"] = target
    elif kind == "size":
        index, size = detail
        for item in nodes[index]["inputs"]:
            if "as_ints" in item["arg"] and item["arg"]["as_ints"]:
                item["arg"]["as_ints"][0] = size
                return
            if "as_int" in item["arg"]:
                item["arg"]["as_int"] = size
                return
    elif kind == "alias":
        index, name = detail
        for item in nodes[index]["inputs"]:
            if "as_tensor" in item["arg"]:
                item["arg"]["as_tensor"]["name"] = name
                return
    elif kind == "declared":
        name, size = detail
        sizes = doc["graph_module"]["graph"]["tensor_values"][name]["sizes"]
        if sizes:
            sizes[-1] = {"as_int": size}
    else:
        index, text = detail
        specs = doc["graph_module"]["signature"]["input_specs"]
        spec = next(iter(specs[index % len(specs)].values()))
        for key in ("buffer_name", "parameter_name"):
            if key in spec:
                spec[key] = spec[key] + text
                return
        nodes[index]["inputs"][0]["name"] = text


def _check_rules(program: pb.PlanProgram) -> None:
    """A verified program keeps the rules when it runs."""
    verified = verify_program(program, limits=LIMITS)
    module = verified.build()
    weights = _base()[1]
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(3, 1, 28, 28)
    seen = x.clone()
    module.train()
    try:
        out = module(x)
    except RuntimeError:
        return  # a run-time refusal breaks no rule
    assert torch.equal(x, seen), "the plan wrote into its input"
    updated = {u.buffer for u in verified.analysis.flow.updates}
    for name, value in module.state_dict().items():
        if name not in updated:
            assert torch.equal(value, before[name]), f"the plan wrote into {name}"
    declared = verified.summary.output
    assert list(out.shape) == [3 if d is None else d for d in declared.shape]
    for line in describe_plan(verified):
        assert line.isprintable(), line


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(_mutation(), min_size=1, max_size=2))
@pytest.mark.slow
def test_mutated_plans_are_refused_or_keep_the_rules(mutations: list[tuple[str, Any]]) -> None:
    program, doc = _doc()
    for mutation in mutations:  # two moves: e.g. an in-place operator, then an alias
        _apply(doc, *mutation)
    mutated = copy.copy(program)
    mutated.train_graph = json.dumps(doc).encode()
    mutated.hash = plan_hash(mutated)
    refusal = ""
    try:
        _check_rules(mutated)
    except PlanRejectedError as exc:
        refusal = str(exc)
    assert refusal.isprintable(), refusal  # a refusal is safe to print too


def test_the_unmutated_plan_verifies_and_keeps_the_rules() -> None:
    program, _ = _doc()
    _check_rules(program)  # positive control: the fuzzer's base reaches the checks


_GRAMMAR_PIECES = st.sampled_from(
    [
        "Symbol('s77', positive=True, integer=True)", "Integer(3)", "Integer(-10000000000000)",
        "Add(", "Mul(", "Pow(", "Min(", "Max(", ", ", ")", "**", "*", "10", "__import__",
        "Symbol('u1')", "lambda", "'", "(", "=", "True",
    ]
)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(_GRAMMAR_PIECES, max_size=12).map("".join) | st.text(max_size=60))
@pytest.mark.slow
def test_the_shape_grammar_parses_or_refuses_anything_at_once(text: str) -> None:
    refusal = ""
    try:
        expr = parse_expression(text, "fuzz")
    except PlanRejectedError as exc:
        refusal = str(exc)
    if refusal:
        assert refusal.isprintable(), refusal
        return
    # What it accepts is a linear form it prints back to the same meaning.
    again = parse_expression(expr.srepr(), "fuzz")
    assert again == expr or all(again.evaluate(v) == expr.evaluate(v) for v in (1, 2, 977))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(-(1 << 40), 1 << 40), st.integers(-(1 << 40), 1 << 40), st.integers(1, 1 << 20))
def test_linear_forms_round_trip_through_the_grammar(const: int, coeff: int, batch: int) -> None:
    expr = Expr(const=const, coeff=coeff, symbol="s0" if coeff else None)
    parsed = parse_expression(expr.srepr(), "fuzz")
    assert parsed.evaluate(batch) == const + coeff * batch
