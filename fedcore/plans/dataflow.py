"""Dataflow rules: what a plan may write, what it may not read, and how data leaves.

On the facts of :mod:`.propagate`:

* **Writes target intermediates only.** An in-place or aliasing write (``mul_``, ``copy_``,
  ``relu_``, a write through a view such as ``buf.mul_(0).add_(x[0])``) into the input batch,
  a parameter or a constant is refused. A buffer may be updated only as an accepted *kind*:

  - ``batch-norm-statistics``: a batch-norm operator updating the running mean or variance
    passed to it (the buffer itself, not a view of it);
  - ``batch-counter``: ``add_`` of an integer literal to a 0-d integer buffer (BatchNorm's
    ``num_batches_tracked``), a value that does not depend on the data.

  The same holds for updates declared as ``buffer_mutation`` outputs: only the running
  statistics a functional batch-norm operator returns for that very buffer.
* **No uninitialised memory.** Operators that return memory as the allocator left it
  (``empty_like``, ...) could carry the worker's freed heap out inside the weights;
  :func:`rewrite_uninitialised` turns them into their zero-filled twins before torch builds
  anything.
* **How data leaves.** What is uploaded after training is the trainable parameters (moved by
  gradients of the loss on the batch) and the accepted buffer updates: :class:`DataFlow`
  lists them for ``describe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedcore.errors import PlanRejectedError
from fedcore.policy.model import BUFFER_KINDS as _POLICY_KINDS

from .propagate import BN_STATS_ARGS, NodeFacts, Write

__all__ = [
    "BUFFER_KINDS",
    "UNINITIALISED",
    "BufferUpdate",
    "DataFlow",
    "check_dataflow",
    "check_declared_updates",
    "rewrite_uninitialised",
]

#: Buffer-update kinds a data owner can accept (``[plans] accept-buffers``), and what each is.
BUFFER_KINDS: dict[str, str] = dict(
    zip(
        _POLICY_KINDS,
        (
            "running mean/variance of a batch-norm layer's input over batches",
            "a count of batches, independent of the data",
        ),
        strict=True,
    )
)

#: Allowed operators that yield uninitialised memory, and the zero-filled operator replacing
#: each (same arguments; ``default`` overloads only, any other overload is refused).
UNINITIALISED: dict[str, str] = {"empty_like": "zeros_like"}
_ATEN = "torch.ops.aten."

_COUNTER_OPS = frozenset({"aten.add_.Tensor", "aten.add_.Scalar"})
_BN_FUNCTIONAL = "aten._native_batch_norm_legit_functional.default"


@dataclass(frozen=True)
class BufferUpdate:
    """A buffer a graph updates, and how."""

    buffer: str
    kind: str  # a key of BUFFER_KINDS
    by: str  # the node and operator that updates it


@dataclass(frozen=True)
class DataFlow:
    """What leaves a worker after training: parameters and the buffer updates."""

    updates: tuple[BufferUpdate, ...] = ()
    rewritten: tuple[str, ...] = ()  # nodes turned from uninitialised into zeros

    def updated(self, kind: str) -> tuple[str, ...]:
        return tuple(sorted({u.buffer for u in self.updates if u.kind == kind}))


def rewrite_uninitialised(doc: dict[str, Any]) -> tuple[str, ...]:
    """Replace every operator of :data:`UNINITIALISED` by its zero-filled twin, in place."""
    rewritten = []
    for node in doc["graph_module"]["graph"]["nodes"]:
        target = str(node.get("target"))
        name, _, overload = target.removeprefix(_ATEN).partition(".")
        if not target.startswith(_ATEN) or name not in UNINITIALISED:
            continue
        if overload != "default":
            raise PlanRejectedError(
                f"{target} yields uninitialised memory and has no zero-filled twin; refused"
            )
        node["target"] = f"{_ATEN}{UNINITIALISED[name]}.default"
        rewritten.append(name)
    return tuple(rewritten)


def _refuse(facts: NodeFacts, write: Write, why: str) -> PlanRejectedError:
    p = write.placeholder
    what = {"input": "the input batch", "constant": f"constant {p.target!r}"}.get(
        p.kind, f"{p.kind} {p.target!r}"
    )
    via = "" if write.direct else " through a view"
    return PlanRejectedError(f"node {facts.name!r} ({facts.op}) writes into {what}{via}: {why}")


def _kind(facts: NodeFacts, write: Write) -> str | None:
    if write.argument in BN_STATS_ARGS.get(facts.op, ()) and write.direct:
        return "batch-norm-statistics"
    other = facts.args.get("other")
    if (
        facts.op in _COUNTER_OPS
        and write.argument == "self"
        and write.direct
        and not write.tainted
        and write.placeholder.scalar_int
        and isinstance(other, int)
        and not isinstance(other, bool)
    ):
        return "batch-counter"
    return None


def check_dataflow(facts: list[NodeFacts], accepted: frozenset[str]) -> tuple[BufferUpdate, ...]:
    """The buffer updates of a graph, once every write in it is allowed.

    Raises:
        PlanRejectedError: a write into the input, a parameter or a constant, or a buffer
            update of a kind that is not in ``accepted``.
    """
    updates: list[BufferUpdate] = []
    for f in facts:
        for w in f.writes:
            kind = w.placeholder.kind
            if kind == "input":
                raise _refuse(f, w, "a plan reads its input and never writes it")
            if kind != "buffer":
                raise _refuse(
                    f,
                    w,
                    "only intermediate tensors may be written (the optimizer moves parameters)",
                )
            update = _kind(f, w)
            if update is None:
                raise _refuse(
                    f,
                    w,
                    "a buffer may only hold batch-norm running statistics (updated by the "
                    "batch-norm operator it is passed to) or a batch counter",
                )
            if update not in accepted:
                raise _refuse(f, w, f"this worker's policy does not accept {update} updates")
            updates.append(BufferUpdate(w.placeholder.target, update, f"{f.name} ({f.op})"))
    return tuple(updates)


def check_declared_updates(
    gm: Any, mutations: dict[str, str], buffers: dict[str, str], accepted: frozenset[str]
) -> tuple[BufferUpdate, ...]:
    """Updates declared as ``buffer_mutation`` outputs (output node -> buffer name).

    ``buffers`` maps each buffer's placeholder name to its state name. Only the running
    statistics a functional batch-norm operator computes for that very buffer are allowed.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    updates = []
    for output, buffer in mutations.items():
        node = nodes.get(output)
        ok = False
        if node is not None and len(node.args) == 2:
            source, index = node.args
            if (
                str(getattr(source, "target", "")) == _BN_FUNCTIONAL
                and index in (3, 4)
                and len(source.args) > index
            ):
                ok = buffers.get(getattr(source.args[index], "name", "")) == buffer
        if not ok:
            raise PlanRejectedError(
                f"the graph declares an update of buffer {buffer!r} from {output!r}, which is "
                "not the running statistics a batch-norm operator computes for it"
            )
        if "batch-norm-statistics" not in accepted:
            raise PlanRejectedError(
                f"buffer {buffer!r}: this worker's policy does not accept batch-norm-statistics"
            )
        updates.append(BufferUpdate(buffer, "batch-norm-statistics", f"{output} (declared)"))
    return tuple(updates)
