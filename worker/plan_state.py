"""Which of a plan's state may leave the worker: derived from its training graph, by kind.

A plan's weights are its parameters and persistent buffers; all of them travel to the worker
and back. A buffer is only a tensor with a name, and a graph may write anything into it (a
training row, say: docs/threat-model.md). So the worker uploads a buffer's trained value only
when the training graph shows it is a statistic of a kind the data owner accepts
(``[plans] accept-buffers``), and sends every other buffer back exactly as received: the
coordinator gets its own bytes, nothing of the data.

Accepted kinds, recognised on the graph (every use of the buffer must be one of these, with
the buffer itself as the argument, never a view of it; one other use and it is withheld):

* ``batch-norm-statistics``: the ``running_mean`` / ``running_var`` argument of a
  batch-norm operator (which updates it with the batch statistics);
* ``batch-counter``: the ``num_batches_tracked`` counter, an integer scalar whose only use
  is ``add_(counter, 1)`` with the result unused.

The same ``accept-buffers`` bounds what the verifier lets a plan update at all.

This is the runtime's rule and does not depend on the verifier: a graph the verifier
misjudges still cannot send any other buffer's content out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fedcore.errors import PlanRejectedError
from fedcore.policy.model import BUFFER_KINDS
from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["BUFFER_KINDS", "ReleasedState", "released_state"]

_BATCH_NORM = frozenset(
    {
        "torch.ops.aten.batch_norm.default",
        "torch.ops.aten._native_batch_norm_legit.default",
        "torch.ops.aten._native_batch_norm_legit_functional.default",
        "torch.ops.aten.native_batch_norm.default",
        "torch.ops.aten._batch_norm_with_update.default",
    }
)
_STATISTICS = frozenset({"running_mean", "running_var"})
_COUNTER = "torch.ops.aten.add_.Tensor"


@dataclass(frozen=True)
class ReleasedState:
    """What of a plan's state is uploaded after training.

    Attributes:
        parameters: the trainable parameters (their trained values leave).
        statistics: buffers of an accepted kind (their trained values leave).
        withheld: every other persistent buffer: uploaded as received, never as trained.
    """

    parameters: frozenset[str]
    statistics: frozenset[str]
    withheld: tuple[str, ...]

    @property
    def released(self) -> frozenset[str]:
        return self.parameters | self.statistics


@dataclass(frozen=True)
class _Use:
    target: str
    argument: str  # the schema name of the argument the tensor is passed as
    direct: bool  # passed as a lone tensor (not inside a list)
    other_args: tuple[Any, ...]
    outputs: tuple[str, ...]


def _tensor_names(arg: Any) -> Iterator[tuple[str, bool]]:
    """(name, direct) of each tensor an argument refers to."""
    if not isinstance(arg, dict):
        return
    for kind, value in arg.items():
        if kind == "as_tensor" and isinstance(value, dict):
            yield str(value.get("name")), True
        elif kind == "as_optional_tensor" and isinstance(value, dict):
            inner = value.get("as_tensor")
            if isinstance(inner, dict):
                yield str(inner.get("name")), True
        elif kind in ("as_tensors", "as_optional_tensors") and isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and "name" in item:
                    yield str(item["name"]), False
                elif isinstance(item, dict):
                    yield from ((n, False) for n, _ in _tensor_names(item))


def _output_names(node: dict[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    for out in node.get("outputs", []):
        names.extend(n for n, _ in _tensor_names(out))
    return tuple(names)


def _uses(nodes: list[Any]) -> dict[str, list[_Use]]:
    uses: dict[str, list[_Use]] = {}
    for node in nodes:
        if not isinstance(node, dict):
            continue
        inputs = [i for i in node.get("inputs", []) if isinstance(i, dict)]
        outputs = _output_names(node)
        for position, item in enumerate(inputs):
            others = tuple(json.dumps(i.get("arg"), sort_keys=True) for i in inputs[position + 1 :])
            for name, direct in _tensor_names(item.get("arg")):
                uses.setdefault(name, []).append(
                    _Use(str(node.get("target")), str(item.get("name")), direct, others, outputs)
                )
    return uses


def _is_statistic(uses: list[_Use]) -> bool:
    return bool(uses) and all(
        u.target in _BATCH_NORM and u.argument in _STATISTICS and u.direct for u in uses
    )


def _is_counter(uses: list[_Use], used: dict[str, list[_Use]], dtype: str, scalar: bool) -> bool:
    return (
        dtype == "int64"
        and scalar
        and len(uses) == 1
        and uses[0].target == _COUNTER
        and uses[0].argument == "self"
        and uses[0].direct
        and uses[0].other_args == (json.dumps({"as_int": 1}),)
        and not any(used.get(out) for out in uses[0].outputs)
    )


def released_state(
    program: pb.PlanProgram,
    *,
    parameters: frozenset[str],
    buffers: dict[str, tuple[str, bool]],
    accept: tuple[str, ...],
) -> ReleasedState:
    """Classify a verified program's state.

    Args:
        program: the verified program (its training graph is read as JSON; nothing runs).
        parameters: the trainable parameters' names.
        buffers: the persistent buffers: name -> (numpy dtype name, is a scalar).
        accept: the buffer kinds the policy accepts (of :data:`BUFFER_KINDS`).
    """
    try:
        doc = json.loads(program.train_graph)
        module = doc["graph_module"]
        nodes = module["graph"]["nodes"]
        specs = module["signature"]["input_specs"]
    except (ValueError, KeyError, TypeError) as exc:  # verified JSON: not expected
        raise PlanRejectedError(f"the training graph cannot be read: {exc}") from None
    placeholder: dict[str, str] = {}  # buffer name -> its name inside the graph
    for spec in specs:
        body = spec.get("buffer") if isinstance(spec, dict) else None
        if isinstance(body, dict) and isinstance(body.get("arg"), dict):
            placeholder[str(body.get("buffer_name"))] = str(body["arg"].get("name"))
    used = _uses(nodes if isinstance(nodes, list) else [])
    statistics: set[str] = set()
    for name, (dtype, scalar) in buffers.items():
        uses = used.get(placeholder.get(name, ""), [])
        if ("batch-norm-statistics" in accept and _is_statistic(uses)) or (
            "batch-counter" in accept and _is_counter(uses, used, dtype, scalar)
        ):
            statistics.add(name)
    withheld = tuple(sorted(n for n in buffers if n not in statistics))
    return ReleasedState(parameters, frozenset(statistics), withheld)
