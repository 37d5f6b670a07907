"""Semantic verification of one graph: run it on fake tensors, then apply the rules.

:func:`analyse_graph` rewrites uninitialised allocations to zeros, rebuilds the graph with
torch's deserializer (verified JSON only), propagates shapes with fake tensors
(:mod:`.propagate`: declared metadata must match what the operators make), and checks the
dataflow rules (:mod:`.dataflow`) and memory bounds (:mod:`.bounds`). Nothing is allocated
at the sizes the graph asks for, and nothing of it runs on real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind

from fedcore.errors import PlanRejectedError
from fedcore.weights import Weights

from .bounds import Activation, activation_of
from .dataflow import DataFlow, check_dataflow, check_declared_updates, rewrite_uninitialised
from .propagate import Placeholder, propagate
from .rebuild import deserialize_program
from .text import one_line
from .verify import GraphSummary, Limits

__all__ = ["GraphAnalysis", "analyse_graph"]

_KINDS = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
    InputKind.USER_INPUT: "input",
}


@dataclass(frozen=True)
class GraphAnalysis:
    """What semantic verification found in one graph."""

    flow: DataFlow
    activation: Activation


def _placeholders(program: torch.export.ExportedProgram) -> dict[str, Placeholder]:
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    out = {}
    for spec in program.graph_signature.input_specs:
        kind = _KINDS.get(spec.kind)
        name = getattr(spec.arg, "name", None)
        if kind is None or name is None:
            raise PlanRejectedError(f"graph input {name!r} of kind {spec.kind} refused")
        value = values.get(name)
        scalar_int = (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and not value.dtype.is_floating_point
            and value.dtype != torch.bool
        )
        out[name] = Placeholder(name, kind, spec.target or name, scalar_int)
    return out


def analyse_graph(
    doc: dict[str, Any],
    summary: GraphSummary,
    constants: Weights,
    *,
    limits: Limits,
    what: str,
    training: bool,
) -> GraphAnalysis:
    """Check what one verified graph does; ``doc`` is rewritten in place (see above).

    Raises:
        PlanRejectedError: the rule it breaks, naming the node.
    """
    rewritten = rewrite_uninitialised(doc)
    program = deserialize_program(doc, summary, constants)
    placeholders = _placeholders(program)
    try:
        facts, batch = propagate(program.graph_module, placeholders)
    except PlanRejectedError as exc:
        raise PlanRejectedError(f"{what}: {exc}") from None
    except Exception as exc:  # torch's symbolic machinery on a hostile graph: refuse
        raise PlanRejectedError(f"{what}: shapes cannot be propagated: {one_line(exc)}") from None
    try:
        updates = check_dataflow(facts, limits.buffer_updates)
        buffers = {p.name: p.target for p in placeholders.values() if p.kind == "buffer"}
        updates += check_declared_updates(
            program.graph_module,
            dict(program.graph_signature.buffers_to_mutate),
            buffers,
            limits.buffer_updates,
        )
    except PlanRejectedError as exc:
        raise PlanRejectedError(f"{what}: {exc}") from None
    if updates and not training:
        raise PlanRejectedError(
            f"{what}: updates buffer {updates[0].buffer!r}; evaluation must not change state"
        )
    activation = activation_of(
        facts,
        batch,
        max_tensor_elements=limits.max_tensor_elements,
        max_example_elements=limits.max_example_elements,
        max_activation_bytes=limits.max_activation_bytes,
        what=what,
    )
    return GraphAnalysis(DataFlow(updates, rewritten), activation)
