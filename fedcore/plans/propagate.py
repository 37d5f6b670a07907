"""Run a verified graph on fake tensors: what each node really makes, writes and reads.

The declared metadata of a graph (every tensor's shape and dtype) is the attacker's word. So
:func:`propagate` runs each node's operator under torch's ``FakeTensorMode`` (shapes and
dtypes only: nothing is allocated, whatever size an argument asks for), starting from the
placeholders' declared shapes, which the JSON check already bounded (one symbolic batch
dimension, fixed sizes elsewhere). Each node's result is compared with what the graph
declares for it; any difference is refused, so the sizes a worker will run are the bounded
sizes the verifier read.

Per node it records (:class:`NodeFacts`):

* the fresh storages it creates, as sympy polynomials in the batch symbol (their elements);
* every placeholder (input, parameter, buffer, constant) whose memory it writes: an
  argument the operator's schema marks as written (``Tensor(a!)``), the running statistics
  of the batch-norm family (whose schemas do not say so), or any placeholder whose version
  counter moved (a write through a view); the written tensor is matched to the placeholder
  by storage, so writes through views count;
* whether it depends on the input batch (taint by storage: a value written into a tensor
  taints that tensor's memory for every later reader).

The checks on these facts live in :mod:`.dataflow` (who may write what) and
:mod:`.bounds` (how big it may grow).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx
from torch._decomp import decomposition_table
from torch._guards import detect_fake_mode

from fedcore.errors import PlanRejectedError

from .text import one_line

__all__ = ["BN_STATS_ARGS", "NodeFacts", "Placeholder", "Write", "propagate"]

#: Operators that update running statistics in place, and the arguments they update.
BN_STATS_ARGS: dict[str, tuple[str, ...]] = {
    "aten.batch_norm.default": ("running_mean", "running_var"),
    "aten.native_batch_norm.default": ("running_mean", "running_var"),
    "aten._native_batch_norm_legit.default": ("running_mean", "running_var"),
    "aten.instance_norm.default": ("running_mean", "running_var"),
}


@dataclass(frozen=True)
class Placeholder:
    """A graph input: its kind (parameter, buffer, constant, input) and state name."""

    name: str
    kind: str  # "parameter", "buffer", "constant", "input"
    target: str  # the state-dict name (the input's own name for the input)
    scalar_int: bool = False  # a 0-d integer tensor (a counter)


@dataclass(frozen=True)
class Write:
    """A node writing into a placeholder's memory."""

    placeholder: Placeholder
    argument: str  # the operator argument written ("" when seen by its version counter)
    direct: bool  # the argument is the placeholder itself, not a view of it
    tainted: bool  # the value written depends on the input batch


@dataclass(frozen=True)
class NodeFacts:
    """What one node of the graph does."""

    name: str
    op: str  # "aten.add_.Tensor", or the Python operator on sizes
    fresh: tuple[sympy.Expr, ...]  # elements of each storage it creates
    itemsizes: tuple[int, ...]  # bytes per element of each
    writes: tuple[Write, ...]
    tainted: bool
    args: dict[str, Any]  # the operator's literal arguments by name (ints, floats, bools)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return f"_operator.{getattr(target, '__name__', '?')}"


def _same_dim(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea = a.node.expr if isinstance(a, torch.SymInt) else sympy.Integer(a)
    eb = b.node.expr if isinstance(b, torch.SymInt) else sympy.Integer(b)
    return bool(sympy.expand(ea - eb) == 0)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    return repr(value)


def _matches(real: Any, declared: Any) -> bool:
    if isinstance(real, torch.Tensor):
        return (
            isinstance(declared, torch.Tensor)
            and real.dtype == declared.dtype
            and real.dim() == declared.dim()
            and all(_same_dim(a, b) for a, b in zip(real.shape, declared.shape, strict=True))
        )
    if isinstance(real, (list, tuple)):
        return (
            isinstance(declared, (list, tuple))
            and len(real) == len(declared)
            and all(_matches(a, b) for a, b in zip(real, declared, strict=True))
        )
    if isinstance(real, (int, torch.SymInt)) and not isinstance(real, bool):
        return isinstance(declared, (int, torch.SymInt)) and _same_dim(real, declared)
    return True  # floats and bools on sizes: nothing to bound


def _arguments(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The node's arguments by schema name."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return {str(i): a for i, a in enumerate(args)}
    named = {a.name: v for a, v in zip(target._schema.arguments, args, strict=False)}
    named.update(kwargs)
    return named


def _written(node: fx.Node, named: dict[str, Any], op: str) -> list[str]:
    """Argument names the operator writes, by its schema and the batch-norm exceptions."""
    names = list(BN_STATS_ARGS.get(op, ()))
    if named.get("training", named.get("use_input_stats")) is False:
        names = []  # batch norm in evaluation mode reads its statistics
    if isinstance(node.target, torch._ops.OpOverload):
        for arg in node.target._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                names.append(arg.name)
    return [n for n in names if named.get(n) is not None]


def _call(target: Any, args: Any, kwargs: Any) -> Any:
    try:
        return target(*args, **kwargs)
    except RuntimeError:
        # Some composite operators (aten.lstm) have C++ kernels that need concrete sizes;
        # torch's own Python decomposition of them works on symbolic ones.
        decomposition = decomposition_table.get(target)
        if decomposition is None:
            raise
        return decomposition(*args, **kwargs)


class _Run:
    def __init__(self, gm: fx.GraphModule, placeholders: dict[str, Placeholder]) -> None:
        self.gm = gm
        self.placeholders = placeholders
        self.env: dict[fx.Node, Any] = {}
        self.owner: dict[int, Placeholder] = {}  # placeholder storages
        self.held: dict[int, torch.Tensor] = {}  # ... and the placeholders' tensors
        self.tainted: set[int] = set()  # storages holding data of the batch
        self.batch: sympy.Symbol | None = None

    def run(self) -> list[NodeFacts]:
        facts: list[NodeFacts] = []
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                self._placeholder(node)
        mode = detect_fake_mode([self.env[n] for n in nodes if n.op == "placeholder"])
        if mode is None:
            raise PlanRejectedError("the graph's inputs carry no shapes")
        # An operator refusing a hostile argument is a refusal, not a traceback in the log.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            with mode:
                for node in nodes:
                    if node.op == "call_function":
                        facts.append(self._call(node))
                    elif node.op not in ("placeholder", "output"):
                        raise PlanRejectedError(f"node {node.name!r} is a {node.op}; refused")
        finally:
            fake_log.setLevel(level)
        return facts

    def _placeholder(self, node: fx.Node) -> None:
        value = node.meta.get("val")
        spec = self.placeholders.get(node.name)
        if not isinstance(value, torch.Tensor) or spec is None:
            raise PlanRejectedError(f"graph input {node.name!r} is not a described tensor")
        self.env[node] = value
        self.owner[_storage(value)] = spec
        self.held[_storage(value)] = value
        if spec.kind == "input":
            self.tainted.add(_storage(value))
            first: Any = value.shape[0] if value.dim() else None
            if not isinstance(first, torch.SymInt) or not isinstance(first.node.expr, sympy.Symbol):
                raise PlanRejectedError("the input's batch dimension is not a plain size symbol")
            self.batch = first.node.expr

    def _call(self, node: fx.Node) -> NodeFacts:
        op = _op_name(node.target)
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        inputs = list(_tensors((args, list(kwargs.values()))))
        tainted = any(_storage(t) in self.tainted for t in inputs)
        versions = {s: self._version(s) for s in self.owner}
        storages = {_storage(t) for t in inputs}
        try:
            result = _call(node.target, args, kwargs)
        except Exception as exc:  # an operator refusing its arguments: refuse the plan
            raise PlanRejectedError(
                f"node {node.name!r} ({op}) fails on its declared inputs: {one_line(exc)}"
            ) from None
        declared = node.meta.get("val")
        if not _matches(result, declared):
            raise PlanRejectedError(
                f"node {node.name!r} ({op}) makes {_describe(result)} but the graph declares "
                f"{_describe(declared)}: its arguments disagree with its metadata"
            )
        self.env[node] = result
        named = _arguments(node, tuple(args), dict(kwargs))
        writes = self._writes(node, named, op, tainted, versions)
        outputs = list(_tensors(result))
        fresh = []
        for t in outputs:
            s = _storage(t)
            if s not in storages and s not in self.owner:
                storages.add(s)
                fresh.append(t)
        if tainted:
            self.tainted.update(_storage(t) for t in outputs)
            # ... and whatever it wrote into (an intermediate, or a view of one)
            written = [named[w] for w in _written(node, named, op)]
            self.tainted.update(_storage(t) for t in _tensors(written))
        literals = {
            k: v for k, v in named.items() if isinstance(v, (int, float, bool)) and v is not None
        }
        return NodeFacts(
            name=node.name,
            op=op,
            fresh=tuple(self._elements(t) for t in fresh),
            itemsizes=tuple(t.element_size() for t in fresh),
            writes=writes,
            tainted=tainted,
            args=literals,
        )

    def _version(self, storage: int) -> int:
        return int(self.held[storage]._version)

    def _writes(
        self,
        node: fx.Node,
        named: dict[str, Any],
        op: str,
        tainted: bool,
        versions: dict[int, int],
    ) -> tuple[Write, ...]:
        writes: dict[int, Write] = {}
        for arg in _written(node, named, op):
            for t in _tensors(named[arg]):
                spec = self.owner.get(_storage(t))
                if spec is not None:
                    direct = any(
                        self.env.get(n) is t and n.op == "placeholder" for n in node.all_input_nodes
                    )
                    writes[_storage(t)] = Write(spec, arg, direct, tainted)
        for storage, version in versions.items():
            if storage not in writes and self._version(storage) != version:
                writes[storage] = Write(self.owner[storage], "", False, tainted)
        if tainted:
            self.tainted.update(writes)
        return tuple(writes.values())

    def _elements(self, t: torch.Tensor) -> sympy.Expr:
        n: Any = t.numel()
        return n.node.expr if isinstance(n, torch.SymInt) else sympy.Integer(int(n))


def propagate(
    gm: fx.GraphModule, placeholders: dict[str, Placeholder]
) -> tuple[list[NodeFacts], sympy.Symbol]:
    """Every node's facts, in graph order (see the module docstring), and the batch symbol.

    Raises:
        PlanRejectedError: a node whose result differs from its declared metadata, or whose
            operator refuses its arguments.
    """
    run = _Run(gm, placeholders)
    facts = run.run()
    if run.batch is None:
        raise PlanRejectedError("the graph has no input batch")
    return facts, run.batch
