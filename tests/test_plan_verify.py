"""Semantic verification of plans (issue 23): what a program does to memory and state.

Each attack is built with the attacker's own tools (tests/plan_attacks.py: torch.export
without fedcore's verifier) and passed on today's main; each has a positive control.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sympy
import torch
from plan_attacks import (
    EmptyLeak,
    FullAsk,
    GrowsWithBatchSquared,
    InputOverwrite,
    RowInBuffer,
    raw_program,
    retouch,
)
from torch import nn

from fedcore.errors import PlanRejectedError
from fedcore.plans import Limits, describe_plan, export_plan, verify_program
from fedcore.plans.bounds import check_batch
from fedcore.plans.shape_expr import parse_expression
from fedcore.v1 import fedcore_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from plan_resnet import make_model as make_resnet

IMAGE = torch.zeros(2, 1, 28, 28)


def _nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = doc["graph_module"]["graph"]["nodes"]
    return nodes


# ------------------------------------------------------------------ honest plans


class BNNet(nn.Module):
    """A CNN with batch normalisation: running statistics are an accepted buffer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu_(self.bn(self.conv(x))).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))  # type: ignore[no-any-return]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(7, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])  # type: ignore[no-any-return]


class GroupSiLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.silu(self.norm(self.conv(x))).mean(dim=(2, 3)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("make", "example"),
    [
        (lambda: make_resnet(width=4), IMAGE),
        (Encoder, torch.zeros(2, 5, 7)),
        (Recurrent, torch.zeros(2, 5, 7)),
        (GroupSiLU, torch.zeros(2, 1, 8, 8)),
        (BNNet, IMAGE),
    ],
    ids=["resnet", "transformer", "lstm", "groupnorm-silu", "batchnorm-cnn"],
)
@pytest.mark.slow
def test_honest_plans_export_verify_and_compute_what_the_model_does(
    make: Any, example: torch.Tensor
) -> None:
    torch.manual_seed(0)
    model = make()
    plan = export_plan(model, example)
    verified = verify_program(plan.program)
    module = verified.build()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in plan.weights.items()})
    x = torch.randn(3, *example.shape[1:])
    model.eval()
    module.eval()
    torch.testing.assert_close(module(x), model(x))
    assert verified.activation.per_example > 0
    text = "\n".join(describe_plan(verified))
    assert "uploads     the trainable parameters, moved by gradients" in text
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        assert "batch-norm-statistics" in text
        assert "batch-counter" in text


def test_batch_norm_statistics_are_the_only_buffer_updates_and_the_policy_can_refuse_them() -> None:
    program = export_plan(BNNet(), IMAGE).program
    verified = verify_program(program)
    kinds = {(u.buffer, u.kind) for u in verified.analysis.flow.updates}
    assert kinds == {
        ("bn.running_mean", "batch-norm-statistics"),
        ("bn.running_var", "batch-norm-statistics"),
        ("bn.num_batches_tracked", "batch-counter"),
    }
    assert not verified.eval_analysis.flow.updates  # evaluation changes no state
    assert verified.updated_buffers == {b for b, _ in kinds}
    with pytest.raises(
        PlanRejectedError, match="policy does not accept batch-norm-statistics updates"
    ):
        verify_program(program, limits=Limits(buffer_updates=frozenset({"batch-counter"})))


# ------------------------------------------------------------------ attack 1: a row in a buffer


def test_attack_1_a_training_row_written_into_a_buffer_through_a_view_is_refused() -> None:
    verify_program(raw_program(BNNet(), IMAGE))  # positive control: same tools, honest model
    with pytest.raises(
        PlanRejectedError,
        match=re.escape("node 'mul_' (aten.mul_.Tensor) writes into buffer 'running_mean'"),
    ):
        verify_program(raw_program(RowInBuffer(), IMAGE))


class _ParameterWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.scale = nn.Parameter(torch.ones(10), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale[:1].copy_(x.flatten(1)[0, :1])
        return self.fc(x.flatten(1)) * self.scale  # type: ignore[no-any-return]


def test_writes_into_parameters_and_the_input_are_refused() -> None:
    with pytest.raises(PlanRejectedError, match="writes into parameter 'scale' through a view"):
        verify_program(raw_program(_ParameterWrite(), IMAGE))
    # Attack 5 at the verifier: the batch is a view of the silo's dataset.
    with pytest.raises(PlanRejectedError, match="writes into the input batch: a plan reads"):
        verify_program(raw_program(InputOverwrite(), IMAGE))


def test_a_declared_buffer_update_must_be_batch_norm_statistics() -> None:
    """A ``buffer_mutation`` output copying the batch's first row into a buffer."""
    program = raw_program(RowInBuffer(), IMAGE)

    def declare(doc: dict[str, Any]) -> None:
        nodes = _nodes(doc)
        doc["graph_module"]["graph"]["nodes"] = [
            n for n in nodes if n["target"] not in ("torch.ops.aten.mul_.Tensor",)
        ]
        for n in doc["graph_module"]["graph"]["nodes"]:
            if n["target"] == "torch.ops.aten.add_.Tensor":
                n["target"] = "torch.ops.aten.add.Tensor"
                n["inputs"][0]["arg"] = {"as_tensor": {"name": "b_running_mean"}}
        doc["graph_module"]["graph"]["outputs"].insert(0, {"as_tensor": {"name": "add_"}})
        specs = doc["graph_module"]["signature"]["output_specs"]
        specs.insert(
            0,
            {
                "buffer_mutation": {
                    "arg": {"name": "add_"},
                    "buffer_name": "running_mean",
                }
            },
        )

    with pytest.raises(PlanRejectedError, match="declares an update of buffer 'running_mean'"):
        verify_program(retouch(program, declare, both=False))


# ------------------------------------------------------------------ attack 2: uninitialised memory


class _EmptyInOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        return h + torch.empty_like(h)  # type: ignore[no-any-return]


def test_attack_2_uninitialised_memory_never_reaches_a_built_plan() -> None:
    with pytest.raises(PlanRejectedError, match="writes into buffer 'stats'"):
        verify_program(raw_program(EmptyLeak(), IMAGE))
    # Used in the computation, empty_like is rewritten to zeros_like before torch builds it.
    verified = verify_program(raw_program(_EmptyInOutput(), IMAGE))
    assert verified.analysis.flow.rewritten == ("empty_like",)
    module = verified.build()
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    module.eval()
    x = torch.randn(4, 1, 28, 28)
    for _ in range(3):  # freed memory of other sizes and contents around each call
        junk = torch.full((4, 10), 1e30)
        del junk
        out = module(x)
        state = module.state_dict()
        expected = nn.functional.linear(x.flatten(1), state["fc.weight"], state["fc.bias"])
        torch.testing.assert_close(out, expected)  # + zeros, not + whatever the heap held
    assert "uninitialised" in "\n".join(describe_plan(verified))


# ------------------------------------------------------------------ attack 3: allocation sizes


def _scale_first_size(target: str, factor: int) -> Any:
    def change(doc: dict[str, Any]) -> None:
        for node in _nodes(doc):
            if node["target"] == target:
                for item in node["inputs"]:
                    arg = item["arg"]
                    if "as_ints" in arg:
                        arg["as_ints"][0] *= factor
                        return
                    if "as_int" in arg:
                        arg["as_int"] *= factor
                        return
        raise AssertionError(f"no {target} node")

    return change


class _Allocations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1)[:, :10])
        a = (
            torch.zeros(7).sum()
            + torch.ones(7).sum()
            + torch.arange(7).sum()
            + h.repeat(1, 7).sum()
        )
        b = self.fc.bias.expand(7, 10).contiguous().sum()
        return h + a + b + nn.functional.interpolate(x, size=(56, 56)).sum()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def allocations() -> pb.PlanProgram:
    return raw_program(_Allocations(), IMAGE)


def test_attack_3_full_asking_2_to_the_50_while_declaring_7_is_refused() -> None:
    program = raw_program(FullAsk(), IMAGE)
    verify_program(program)  # positive control
    started = time.perf_counter()
    with pytest.raises(
        PlanRejectedError,
        match=re.escape(
            "node 'full' (aten.full.default) makes float32[1125899906842624] but the graph declares float32[7]"
        ),
    ):
        verify_program(retouch(program, _set_full(1 << 50)))
    assert time.perf_counter() - started < 10  # nothing was allocated


def _set_full(size: int) -> Any:
    def change(doc: dict[str, Any]) -> None:
        for node in _nodes(doc):
            if node["target"] == "torch.ops.aten.full.default":
                node["inputs"][0]["arg"] = {"as_ints": [size]}

    return change


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.aten.zeros.default",
        "torch.ops.aten.ones.default",
        "torch.ops.aten.arange.default",
        "torch.ops.aten.repeat.default",
        "torch.ops.aten.expand.default",
        "torch.ops.aten.upsample_nearest2d.vec",
    ],
)
def test_attack_3_size_arguments_that_disagree_with_the_metadata_are_refused(
    allocations: pb.PlanProgram, target: str
) -> None:
    with pytest.raises(PlanRejectedError, match="its arguments disagree with its metadata"):
        verify_program(retouch(allocations, _scale_first_size(target, 1 << 20)))


@pytest.mark.slow
def test_allocations_are_bounded_in_size_growth_and_total() -> None:
    verify_program(raw_program(_Allocations(), IMAGE))  # positive control
    with pytest.raises(PlanRejectedError, match="grows faster than the batch"):
        verify_program(raw_program(GrowsWithBatchSquared(), IMAGE))

    def honest_but_huge(doc: dict[str, Any]) -> None:  # metadata and argument agree
        _set_full(1 << 28)(doc)
        doc["graph_module"]["graph"]["tensor_values"]["full"]["sizes"] = [{"as_int": 1 << 28}]

    program = retouch(raw_program(FullAsk(), IMAGE), honest_but_huge)
    with pytest.raises(PlanRejectedError, match=r"above this worker's max-activation-bytes"):
        verify_program(program, limits=Limits(max_activation_bytes=1 << 28))
    verified = verify_program(program, limits=Limits(max_activation_bytes=1 << 31))
    check_batch(verified.activation, 32, 1 << 31)
    with pytest.raises(PlanRejectedError, match="the largest batch that fits is"):
        check_batch(verified.activation, 32, (1 << 30) + 1000)


# ------------------------------------------------------------------ attack 4: shape expressions


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("s0*10**10**7", "unexpected"),
        ("Pow(Integer(10), Pow(Integer(10), Integer(9)))", "'Pow' is not allowed"),
        (
            "Mul(Symbol('s77', positive=True, integer=True), Symbol('s77', positive=True, integer=True))",
            "a product of symbols",
        ),
        ("Integer(" + "9" * 5000 + ")", "not a short string"),
        ("Symbol('s1', positive=True, integer=True)", "a symbol other than 's77'"),
        ("Symbol('s77', commutative=False)", "assumption 'commutative'"),
    ],
)
def test_attack_4_shape_expressions_outside_the_grammar_are_refused_fast(
    expr: str, why: str
) -> None:
    program = raw_program(FullAsk(), IMAGE)

    def inject(doc: dict[str, Any]) -> None:
        meta = doc["graph_module"]["graph"]["tensor_values"]["x"]
        meta["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 2}}}

    started = time.perf_counter()
    with pytest.raises(PlanRejectedError, match=re.escape(why)):
        verify_program(retouch(program, inject))
    assert time.perf_counter() - started < 1.0  # refused before sympy or torch saw it


@pytest.mark.slow
def test_only_text_fedcore_printed_reaches_sympy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = sympy.sympify

    def spy(text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            seen.append(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", spy)
    verify_program(raw_program(Recurrent(), torch.zeros(2, 5, 7))).build()
    assert seen  # the positive control: the deserializer does parse expressions
    for text in seen:
        assert parse_expression(text, "test").srepr() == text or re.fullmatch(r"s[0-9]+", text)


def test_the_grammar_reads_linear_forms_and_prints_them_back() -> None:
    text = "Add(Integer(-1), Mul(Integer(2), Symbol('s3', positive=True, integer=True)))"
    expr = parse_expression(text, "x")
    assert (expr.const, expr.coeff, expr.symbol) == (-1, 2, "s3")
    assert expr.srepr() == text
    assert expr.evaluate(10) == 19
    nested = parse_expression(
        "Min(Integer(16), Mul(Integer(16), Symbol('s7', positive=True, integer=True)))", "x"
    )
    assert nested.evaluate(3) == 16
    assert nested.evaluate(0) == 0


# ------------------------------------------------------------------ attack 6: hostile strings


REVIEWER = "\x1b[2K\r\x1b[1A\x1b[2K  updates     nothing (reviewed: SAFE)"


@pytest.mark.slow
def test_attack_6_names_with_control_characters_are_refused() -> None:
    def traced(doc: dict[str, Any]) -> None:  # node metadata is dropped unread
        _nodes(doc)[0]["metadata"] = {"stack_trace": 'File "model.py", line 3\n  forward'}

    verify_program(retouch(raw_program(FullAsk(), IMAGE), traced))  # positive control
    program = raw_program(RowInBuffer(), IMAGE)

    def rename(doc: dict[str, Any]) -> None:
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if "buffer" in spec:
                spec["buffer"]["buffer_name"] = REVIEWER

    with pytest.raises(PlanRejectedError, match="is not an identifier") as refused:
        verify_program(retouch(program, rename))
    assert "\x1b" not in str(refused.value)

    def hostile_key(doc: dict[str, Any]) -> None:  # a field whose name is the payload
        doc["graph_module"]["graph"]["tensor_values"]["x"][REVIEWER] = {"y": "\x07"}

    with pytest.raises(PlanRejectedError, match="not printable") as refused:
        verify_program(retouch(program, hostile_key))
    assert str(refused.value).isprintable()
    named = pb.PlanProgram()
    named.CopyFrom(export_plan(BNNet(), IMAGE).program)
    named.name = REVIEWER
    from fedcore.plans import plan_hash

    named.hash = plan_hash(named)
    with pytest.raises(PlanRejectedError, match="holds control characters") as refused:
        verify_program(named)
    assert "\x1b" not in str(refused.value)


def test_describe_escapes_everything_it_prints() -> None:
    from dataclasses import replace

    from fedcore.plan import TrainConfig

    verified = verify_program(export_plan(BNNet(), IMAGE).program)
    program = pb.PlanProgram()
    program.CopyFrom(verified.program)
    program.name = REVIEWER  # as if a name reached describe unverified
    config = TrainConfig(extra={REVIEWER: 1.0})
    lines = describe_plan(replace(verified, program=program), train=config)
    text = "\n".join(lines)
    assert not any(ch in text for ch in "\x1b\r")
    assert all(line.isprintable() for line in lines)
    assert "\\x1b[2K" in text  # shown, escaped


@pytest.mark.slow
def test_the_policy_sets_the_activation_limit_and_the_accepted_buffer_updates(
    tmp_path: Path,
) -> None:
    from fedcore.errors import PolicyError
    from fedcore.plans import limits_for
    from fedcore.policy import load_policy, parse_policy

    path = tmp_path / "policy.toml"
    path.write_text("[plans]\nmax-activation-bytes = 1000\naccept-buffers = ['batch-counter']\n")
    limits = limits_for(load_policy(path).plans, max_state_bytes=1 << 30)
    assert limits.max_activation_bytes == 1000
    assert limits.buffer_updates == {"batch-counter"}
    with pytest.raises(PlanRejectedError, match="max-activation-bytes \\(1,000\\)"):
        verify_program(export_plan(GroupSiLU(), torch.zeros(2, 1, 8, 8)).program, limits=limits)
    default = limits_for(parse_policy({}, path).plans, max_state_bytes=1)
    assert default.max_activation_bytes > 1 << 28  # a quarter of this machine's memory
    assert default.buffer_updates == {"batch-norm-statistics", "batch-counter"}
    path.write_text("[plans]\naccept-buffers = ['anything']\n")
    with pytest.raises(PolicyError, match=r"accept-buffers.*unknown kind"):
        load_policy(path)


def test_the_two_old_buffer_keys_read_as_the_one_accept_buffers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 27: `accept-buffer-updates` (the verifier's) and `accept-buffers` (the upload's)
    are one key; the old key is still read, with a deprecation message, and the old kind
    name `batch-norm` means both kinds."""
    from fedcore.errors import PolicyError
    from fedcore.policy import load_policy

    path = tmp_path / "policy.toml"
    path.write_text("[plans]\naccept-buffer-updates = ['batch-counter']\n")
    with caplog.at_level("WARNING", logger="fedcore.policy"):
        assert load_policy(path).plans.accept_buffers == ("batch-counter",)
    assert "accept-buffer-updates is deprecated; name it accept-buffers" in caplog.text
    path.write_text("[plans]\naccept-buffers = ['batch-norm']\n")
    assert load_policy(path).plans.accept_buffers == ("batch-norm-statistics", "batch-counter")
    path.write_text("[plans]\naccept-buffers = []\naccept-buffer-updates = []\n")
    with pytest.raises(PolicyError, match="old name of accept-buffers"):
        load_policy(path)


class _CounterOfData(nn.Module):
    """A "counter" fed with the data (through an intermediate written in place)."""

    num_batches_tracked: torch.Tensor  # registered as a buffer below

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tmp = torch.zeros((), dtype=torch.long)
        tmp.add_((x.flatten(1)[0, 0] * 255).long())
        self.num_batches_tracked.add_(tmp)
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def test_a_counter_may_only_count_by_a_literal() -> None:
    with pytest.raises(PlanRejectedError, match="writes into buffer 'num_batches_tracked'"):
        verify_program(raw_program(_CounterOfData(), IMAGE))


def test_fed_plan_show_prints_a_hostile_plan_name_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcore.plans import Plan, plan_hash, write_plan_file
    from fedcore.plans.cli import main

    plan = export_plan(BNNet(), IMAGE)
    path = tmp_path / "bn.plan"
    write_plan_file(plan, path)
    assert main(["show", str(path)]) == 0  # positive control
    assert "batch-norm-statistics" in capsys.readouterr().out
    program = pb.PlanProgram()
    program.CopyFrom(plan.program)
    program.name = REVIEWER
    program.hash = plan_hash(program)
    write_plan_file(Plan(program, plan.weights), path)
    assert main(["show", str(path)]) != 0
    captured = capsys.readouterr()
    assert "holds control characters" in captured.err
    assert "\x1b" not in captured.out + captured.err


def test_every_allowed_operator_that_yields_uninitialised_memory_is_rewritten() -> None:
    from fedcore.plans.allowlist import is_allowed
    from fedcore.plans.dataflow import UNINITIALISED

    uninitialised = [
        "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
        "empty_permuted", "resize_", "resize_as_", "_empty_affine_quantized",
    ]  # fmt: skip
    for name in uninitialised:
        if is_allowed(f"torch.ops.aten.{name}.default"):
            assert name in UNINITIALISED, name
    for replacement in UNINITIALISED.values():
        assert is_allowed(f"torch.ops.aten.{replacement}.default")
    assert UNINITIALISED  # positive control: empty_like is allowed, and rewritten

    def other_overload(doc: dict[str, Any]) -> None:
        for node in _nodes(doc):
            if node["target"] == "torch.ops.aten.empty_like.default":
                node["target"] = "torch.ops.aten.empty_like.memory_format"

    program = retouch(raw_program(_EmptyInOutput(), IMAGE), other_overload)
    with pytest.raises(PlanRejectedError, match="yields uninitialised memory"):
        verify_program(program)


class _StatsInEvaluation(nn.Module):
    """Batch statistics updated in evaluation too (the test set's, this time)."""

    running_mean: torch.Tensor  # registered as buffers below
    running_var: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.register_buffer("running_mean", torch.zeros(10))
        self.register_buffer("running_var", torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        return nn.functional.batch_norm(h, self.running_mean, self.running_var, training=True)


def test_the_evaluation_graph_may_update_no_buffer() -> None:
    with pytest.raises(PlanRejectedError, match="evaluation graph: updates buffer"):
        verify_program(raw_program(_StatsInEvaluation(), IMAGE))
