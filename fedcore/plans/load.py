"""From a received program to a trainable ``nn.Module``: verify, then deserialize safely.

:func:`verify_program` checks everything on the JSON and the typed payloads (see
:mod:`.verify`). Only a verified program reaches :meth:`VerifiedPlan.build`, which hands
torch's deserializer the checked JSON and tensors fedcore allocated itself (never bytes:
``deserialize_torch_artifact`` would fall back to ``torch.load(weights_only=False)``).

The result is a :class:`PlanModule`: the training graph's ``GraphModule`` and the evaluation
graph's, sharing one set of parameters and buffers, switched by ``train()`` / ``eval()``
(the modules ``torch.export`` unlifts refuse both calls). Its ``state_dict`` has the names
of the exported model's, so weights move between a plan and the registered model it was
exported from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedcore.errors import PlanRejectedError
from fedcore.losses import LOSSES
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, describe_mismatch, signature_of

from .analysis import GraphAnalysis, analyse_graph
from .bounds import Activation
from .format import FORMAT_VERSION, constants_of, model_name_for, plan_hash
from .rebuild import deserialize_program
from .text import one_line, printable
from .verify import GraphSummary, Limits, check_printable, verify_graph

__all__ = ["PlanModule", "VerifiedPlan", "verify_program"]


@dataclass(frozen=True)
class VerifiedPlan:
    """A program that passed verification, and what it does."""

    program: pb.PlanProgram
    summary: GraphSummary  # of the training graph
    eval_summary: GraphSummary
    _train_doc: dict[str, Any]
    _eval_doc: dict[str, Any]
    constants: Weights
    analysis: GraphAnalysis  # of the training graph
    eval_analysis: GraphAnalysis

    @property
    def activation(self) -> Activation:
        """Bytes the larger of the two graphs' tensors take, as a function of the batch."""
        a, b = self.analysis.activation, self.eval_analysis.activation
        return Activation(max(a.fixed, b.fixed), max(a.per_example, b.per_example))

    @property
    def updated_buffers(self) -> frozenset[str]:
        """The buffers training may change (accepted kinds): with the trainable parameters,
        all of the state that may leave the worker after training."""
        return frozenset(u.buffer for u in self.analysis.flow.updates)

    @property
    def hash(self) -> str:
        return self.program.hash

    @property
    def model_name(self) -> str:
        return model_name_for(self.program.hash)

    @property
    def signature(self) -> ModelSignature:
        """The federated weights' signature: parameters and persistent buffers."""
        return self.summary.state

    def build(self) -> PlanModule:
        """A fresh trainable module (weights zero: load the round's with ``set_weights``)."""
        train_gm = _deserialize(self._train_doc, self.summary, self.constants)
        eval_gm = _deserialize(self._eval_doc, self.eval_summary, self.constants)
        module = PlanModule(train_gm, eval_gm, loss=self.program.loss, plan_hash=self.hash)
        # 2-D convolutions run faster channels-last on the CPU (fedcore.training.fast_layout).
        module.convolutional = any(op.startswith("aten.conv2d") for op in self.summary.ops)
        return module


def verify_program(program: pb.PlanProgram, *, limits: Limits | None = None) -> VerifiedPlan:
    """Check a received program completely; nothing of it is executed.

    Raises:
        PlanRejectedError: what is wrong, naming the node or field (printable: a refusal
            quotes the plan, and goes to logs and to the coordinator).
    """
    try:
        return _verify(program, limits or Limits())
    except PlanRejectedError as exc:
        raise PlanRejectedError(printable(str(exc))) from None


def _verify(program: pb.PlanProgram, limits: Limits) -> VerifiedPlan:
    if program.format_version != FORMAT_VERSION:
        raise PlanRejectedError(
            f"plan format version {program.format_version}; this worker reads {FORMAT_VERSION}"
        )
    digest = plan_hash(program)
    if program.hash != digest:
        raise PlanRejectedError(
            f"the plan's hash {program.hash[:16]!r} does not match its content ({digest[:16]})"
        )
    check_printable(program.name, "the plan's name")
    if program.loss not in LOSSES:
        raise PlanRejectedError(
            f"the plan names loss {program.loss!r}; fedcore's losses: {', '.join(LOSSES)}"
        )
    train_doc, summary = verify_graph(program.train_graph, what="training graph", limits=limits)
    eval_doc, eval_summary = verify_graph(
        program.eval_graph, what="evaluation graph", limits=limits
    )
    for kind in ("state", "constants"):
        mismatch = describe_mismatch(
            tuple(sorted(getattr(summary, kind), key=lambda t: t.name)),
            tuple(sorted(getattr(eval_summary, kind), key=lambda t: t.name)),
        )
        if mismatch is not None:
            raise PlanRejectedError(f"the evaluation graph's {kind} differ: {mismatch}")
    if summary.input != eval_summary.input or summary.output != eval_summary.output:
        raise PlanRejectedError("the training and evaluation graphs take or give other shapes")
    constants = constants_of(program, max_bytes=limits.max_constant_bytes)
    # Constants are handed over by name: their order does not matter.
    mismatch = describe_mismatch(
        tuple(sorted(summary.constants, key=lambda t: t.name)),
        tuple(sorted(signature_of(constants), key=lambda t: t.name)),
    )
    if mismatch is not None:
        raise PlanRejectedError(f"the plan's constants do not fit its graphs: {mismatch}")
    analysis = analyse_graph(
        train_doc, summary, constants, limits=limits, what="training graph", training=True
    )
    eval_analysis = analyse_graph(
        eval_doc, eval_summary, constants, limits=limits, what="evaluation graph", training=False
    )
    return VerifiedPlan(
        program, summary, eval_summary, train_doc, eval_doc, constants, analysis, eval_analysis
    )


def _deserialize(doc: dict[str, Any], summary: GraphSummary, constants: Weights) -> nn.Module:
    try:
        module = deserialize_program(doc, summary, constants).module()
    except PlanRejectedError:
        raise
    except Exception as exc:  # verified JSON torch still cannot unlift: refuse, never crash
        raise PlanRejectedError(
            f"torch could not rebuild the verified graph: {one_line(exc)}"
        ) from None
    # Lifted tensor constants are plain attributes; buffers follow .to(device).
    for t in summary.constants:
        if "." not in t.name and t.name not in dict(module.named_buffers(recurse=False)):
            value = getattr(module, t.name, None)
            if isinstance(value, torch.Tensor):
                delattr(module, t.name)
                module.register_buffer(t.name, value, persistent=False)
    return module


class PlanModule(nn.Module):
    """A verified plan as a module: training and evaluation graphs over shared weights.

    ``fedcore_loss`` names the loss fedcore's training loop applies (see
    :mod:`fedcore.losses`). ``opacus_compatible`` is False: Opacus' per-example gradients
    need layer modules, and a plan has none (DP-SGD refuses it with that reason).
    """

    opacus_compatible = False
    convolutional = False  # has 2-D convolutions (set by VerifiedPlan.build)

    def __init__(self, train_gm: nn.Module, eval_gm: nn.Module, *, loss: str, plan_hash: str):
        super().__init__()
        self.fedcore_loss = loss
        self.plan_hash = plan_hash
        for name, child in train_gm.named_children():
            if name.startswith("_"):  # torch's guard function, not part of the model
                continue
            self.add_module(name, child)
            setattr(eval_gm, name, child)
        persistent = set(train_gm.state_dict(keep_vars=True))
        for name, param in train_gm.named_parameters(recurse=False):
            self.register_parameter(name, param)
            setattr(eval_gm, name, param)
        for name, buf in train_gm.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name in persistent)
        # Held outside the module tree: their children are already ours.
        self._graphs: tuple[nn.Module, nn.Module] = (train_gm, eval_gm)
        self._sync_buffers()

    def _sync_buffers(self) -> None:
        # Module._apply replaces buffer objects; point both graphs at the current ones.
        for gm in self._graphs:
            for name, buf in self.named_buffers(recurse=False):
                if name in dict(gm.named_buffers(recurse=False)):
                    setattr(gm, name, buf)
                else:
                    gm.register_buffer(name, buf)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> PlanModule:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._sync_buffers()
        return self

    def train(self, mode: bool = True) -> PlanModule:
        # Unlifted graph modules refuse train()/eval(): only our flag and children switch.
        self.training = mode
        for child in self.children():
            child.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        graph = self._graphs[0] if self.training else self._graphs[1]
        out: torch.Tensor = graph(x)
        return out


def weights_fit(plan: VerifiedPlan, weights: Weights) -> str | None:
    """How ``weights`` differ from what ``plan`` takes, or None."""
    return describe_mismatch(plan.signature, signature_of(weights))
