"""Verification of a received graph, on the JSON alone, before torch sees a byte of it.

torch's deserializer is not a parser for hostile input: it resolves any ``torch.*`` name a
node targets, hands shape expressions to ``sympy.sympify`` (which evaluates them), runs
``guards_code`` as Python, and loads tensor artifacts with a fallback to pickle. So
:func:`verify_graph` reads the JSON itself and refuses, naming the offending node or field:

* anything that is not the JSON torch's export serializer writes (unknown keys, bad types);
* a node whose target is not on the allow-list (:mod:`.allowlist`): Python callables, custom
  operators, higher-order operators;
* arguments that are sub-graphs, custom (torchbind) objects or operators;
* torchbind / custom-object inputs, effect tokens, guard code, named-tuple definitions;
* shape expressions outside fedcore's own grammar (:mod:`.shape_expr`: linear forms in the
  one batch symbol); each is replaced by fedcore's printing of what it parsed, so torch's
  ``sympify`` only ever reads text the verifier wrote;
* names (nodes, tensors, parameters, buffers) that are not identifiers;
* parameters, buffers, constants and inputs beyond the size limits, before any allocation.

What passes is a :class:`GraphSummary` (operations, input and output shapes, the state's
signature) and the document with node metadata dropped (stack traces and module paths,
which only the exporter needs).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import PlanRejectedError
from fedcore.policy.model import PlanRules
from fedcore.weights import ModelSignature, TensorSignature

from .allowlist import is_allowed
from .dataflow import BUFFER_KINDS
from .shape_expr import SYMBOL_NAME, parse_expression

__all__ = [
    "MAX_BATCH",
    "GraphSummary",
    "Limits",
    "TensorInfo",
    "check_name",
    "check_printable",
    "limits_for",
    "verify_graph",
]

#: The largest batch a plan's dynamic batch dimension admits.
MAX_BATCH = 1 << 20


def default_activation_bytes() -> int:
    """A quarter of this machine's physical memory (4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything is allocated.

    ``max_activation_bytes`` bounds the memory a graph's tensors take (``[plans]
    max-activation-bytes``; a quarter of physical memory by default); ``buffer_updates``
    are the buffer-update kinds the data owner accepts (``[plans] accept-buffers``, see
    :data:`~.dataflow.BUFFER_KINDS`).
    """

    max_graph_bytes: int = 32 * 1024 * 1024
    max_nodes: int = 10_000
    max_state_bytes: int = 2 * 1024**3
    max_constant_bytes: int = 64 * 1024 * 1024
    #: elements of one example's input, and of any tensor's fixed dimensions
    max_example_elements: int = 50_000_000
    max_tensor_elements: int = 2**31
    max_activation_bytes: int = field(default_factory=default_activation_bytes)
    buffer_updates: frozenset[str] = frozenset(BUFFER_KINDS)


def limits_for(rules: PlanRules, *, max_state_bytes: int) -> Limits:
    """The verifier's limits under a worker's ``[plans]`` policy."""
    return Limits(
        max_state_bytes=max_state_bytes,
        max_activation_bytes=rules.max_activation_bytes or default_activation_bytes(),
        buffer_updates=frozenset(rules.accept_buffers),
    )


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: dtype and shape (``None`` for the dynamic batch dimension)."""

    dtype: str
    shape: tuple[int | None, ...]

    def __str__(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class GraphSummary:
    """What a verified graph does, in terms a data owner can judge."""

    ops: Counter[str]
    input: TensorInfo
    output: TensorInfo
    state: ModelSignature  # parameters and persistent buffers: the federated weights
    trainable: frozenset[str]  # which of them are parameters
    constants: ModelSignature  # tensor constants and non-persistent buffers
    nodes: int
    mutated_buffers: tuple[str, ...] = field(default=())

    @property
    def num_parameters(self) -> int:
        return sum(t.num_elements for t in self.state if t.name in self.trainable)


# torch's serialized ScalarType names -> numpy dtype names (the types fedcore can carry).
_DTYPES = {
    "BYTE": "uint8",
    "CHAR": "int8",
    "SHORT": "int16",
    "INT": "int32",
    "LONG": "int64",
    "HALF": "float16",
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "BOOL": "bool",
}

_TOP_KEYS = frozenset(
    {
        "graph_module",
        "opset_version",
        "range_constraints",
        "schema_version",
        "verifiers",
        "torch_version",
        "guards_code",
    }
)
_GRAPH_MODULE_KEYS = frozenset(
    {"graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"}
)
_GRAPH_KEYS = frozenset(
    {
        "inputs",
        "outputs",
        "nodes",
        "tensor_values",
        "sym_int_values",
        "sym_bool_values",
        "sym_float_values",
        "is_single_tensor_return",
        "custom_obj_values",
    }
)
# Argument kinds a node may take: tensors, numbers, sizes, dtypes and the like.
_ARG_KINDS = frozenset(
    {
        "as_none",
        "as_tensor",
        "as_tensors",
        "as_optional_tensor",
        "as_optional_tensors",
        "as_int",
        "as_ints",
        "as_float",
        "as_floats",
        "as_bool",
        "as_bools",
        "as_string",
        "as_strings",
        "as_sym_int",
        "as_sym_ints",
        "as_sym_float",
        "as_sym_floats",
        "as_sym_bool",
        "as_sym_bools",
        "as_scalar_type",
        "as_memory_format",
        "as_layout",
        "as_device",
        "as_int_lists",
        "as_complex",
    }
)
_REFUSED_ARG_KINDS = {
    "as_custom_obj": "a custom (torchbind) object",
    "as_graph": "a sub-graph (higher-order operators are not allowed)",
    "as_operator": "an operator passed as a value",
    "as_sym_float_list": "a list of symbolic floats",
}
_INPUT_KINDS = frozenset({"parameter", "buffer", "tensor_constant", "user_input"})
_OUTPUT_KINDS = frozenset({"user_output", "buffer_mutation"})
_TREESPEC_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", None})

# Names a graph gives its nodes and tensors, and the state's dotted names ("blocks.0.conv1").
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_STATE_NAME = re.compile(r"[A-Za-z0-9_]{1,100}(?:\.[A-Za-z0-9_]{1,100}){0,15}")


def _reject(message: str) -> PlanRejectedError:
    return PlanRejectedError(message)


def check_name(name: object, where: str, *, dotted: bool = False) -> str:
    """``name`` if it is an identifier (``dotted``: identifiers joined by dots); else refuse."""
    pattern = _STATE_NAME if dotted else _IDENTIFIER
    if not isinstance(name, str) or not pattern.fullmatch(name) or len(name) > 512:
        shown = repr(name)[:60] if isinstance(name, str) else type(name).__name__
        raise _reject(f"{where}: name {shown} is not an identifier")
    return name


_NAME_KEYS = frozenset({"name", "as_name"})
_STATE_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "fqn"})
_NAMED_MAPS = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"})
_PRINTABLE = re.compile(r"[\x20-\x7e]{0,200}")


def check_printable(text: str, where: str, *, limit: int = 1000) -> None:
    """Refuse free text with control or other non-printable characters, or too long."""
    if len(text) > limit or not text.isprintable():
        raise _reject(f"{where} {text[:60]!r} holds control characters or is too long")


def _check_strings(doc: dict[str, Any], what: str) -> None:
    """Every string of the graph: names are identifiers, other strings printable ASCII, and
    shape expressions parse with fedcore's grammar (each replaced by fedcore's printing)."""
    ranges = doc.get("range_constraints", {})
    _require(isinstance(ranges, dict) and len(ranges) == 1, f"{what}: needs one size symbol")
    ((symbol, bounds),) = ranges.items()
    _require(
        isinstance(symbol, str) and SYMBOL_NAME.fullmatch(symbol) is not None,
        f"{what}: size symbol {str(symbol)[:40]!r} is not a size symbol",
    )
    _require(
        isinstance(bounds, dict)
        and set(bounds) == {"min_val", "max_val"}
        and type(bounds["min_val"]) is int
        and type(bounds["max_val"]) is int
        and 1 <= bounds["min_val"] <= bounds["max_val"] <= MAX_BATCH,
        f"{what}: the range of {symbol!r} is not within 1..{MAX_BATCH}",
    )
    for where, parent, key, value in _walk_parents(doc, what):
        if key == "expr_str":
            expr = parse_expression(value, where)
            if expr.symbols() - {symbol}:
                raise _reject(f"{where}: shape expression uses a symbol other than {symbol!r}")
            parent[key] = expr.srepr()
        elif key in _NAME_KEYS and not (value == "" and ("inputs" in parent or "arg" in parent)):
            check_name(value, where)
        elif key in _STATE_KEYS and not (key == "fqn" and value == ""):
            check_name(value, where, dotted=True)
        elif key in _NAMED_MAPS and isinstance(value, dict):
            for name in value:
                check_name(name, f"{where}.{key}")
        elif isinstance(value, str) and key not in ("in_spec", "out_spec"):
            _require(_PRINTABLE.fullmatch(value) is not None, f"{where}.{key}: not printable")
        elif key == "hint":
            hint_kind, hint = _one_key(value, where) if value is not None else ("as_int", 1)
            _require(
                hint_kind == "as_int" and type(hint) is int and abs(hint) <= MAX_BATCH * 2**20,
                f"{where}: malformed size hint",
            )


def _walk_parents(value: Any, path: str) -> Iterator[tuple[str, dict[str, Any], str, Any]]:
    """Every (path, parent object, key, value) of a JSON document."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, item in list(current.items()):
                if key == "metadata" and "target" in current:
                    continue  # a node's stack trace and module path: dropped unread
                yield where, current, key, item
                stack.append((item, f"{where}.{key}"))
        elif isinstance(current, list):
            for index, item in enumerate(current):
                stack.append((item, f"{where}[{index}]"))


def _walk(value: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """Every (path, key, value) of a JSON document."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, item in current.items():
                yield where, key, item
                stack.append((item, f"{where}.{key}"))
        elif isinstance(current, list):
            for index, item in enumerate(current):
                stack.append((item, f"{where}[{index}]"))


def _one_key(value: Any, where: str) -> tuple[str, Any]:
    if not isinstance(value, dict) or len(value) != 1:
        raise _reject(f"{where}: expected an object with one field")
    ((key, item),) = value.items()
    return str(key), item


def _dims(sizes: Any, where: str) -> tuple[int | None, ...]:
    """Concrete dimensions as ints, symbolic ones as None."""
    if not isinstance(sizes, list) or len(sizes) > 16:
        raise _reject(f"{where}: sizes must be a list of at most 16 dimensions")
    out: list[int | None] = []
    for size in sizes:
        kind, value = _one_key(size, where)
        if kind == "as_int" and type(value) is int and value >= 0:
            out.append(value)
        elif kind == "as_expr":
            out.append(None)
        else:
            raise _reject(f"{where}: a dimension is neither a size nor a size expression")
    return tuple(out)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _reject(message)


def verify_graph(
    raw: bytes, *, what: str = "graph", limits: Limits | None = None
) -> tuple[dict[str, Any], GraphSummary]:
    """Check one serialized graph; return it (node metadata dropped) and what it does.

    Raises:
        PlanRejectedError: the first problem found, with the node or field it is in.
    """
    limits = limits or Limits()
    if len(raw) > limits.max_graph_bytes:
        raise _reject(f"{what}: {len(raw)} bytes, above the limit of {limits.max_graph_bytes}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _reject(f"{what}: not valid JSON ({exc})") from None
    _require(isinstance(doc, dict), f"{what}: not a JSON object")
    unknown = set(doc) - _TOP_KEYS
    _require(not unknown, f"{what}: unknown fields {sorted(unknown)}")
    _require(doc.get("verifiers") == ["TRAINING"], f"{what}: not a training-IR export")
    _require(doc.get("guards_code", []) == [], f"{what}: carries guard code (Python source)")
    _check_strings(doc, what)
    gm = doc.get("graph_module")
    _require(isinstance(gm, dict), f"{what}: no graph_module")
    unknown = set(gm) - _GRAPH_MODULE_KEYS
    _require(not unknown, f"{what}: unknown graph_module fields {sorted(unknown)}")
    _require(not gm.get("treespec_namedtuple_fields"), f"{what}: defines named tuples")
    _require(not gm.get("metadata"), f"{what}: carries module metadata")
    _check_call_graph(gm.get("module_call_graph", []), what)
    graph = gm.get("graph")
    _require(isinstance(graph, dict), f"{what}: no graph")
    unknown = set(graph) - _GRAPH_KEYS
    _require(not unknown, f"{what}: unknown graph fields {sorted(unknown)}")
    custom = graph.get("custom_obj_values", {})
    if custom:
        name = next(iter(custom))
        raise _reject(f"{what}: {name!r} is a custom (torchbind) object; plans hold tensors only")
    tensors = graph.get("tensor_values", {})
    _require(isinstance(tensors, dict), f"{what}: malformed tensor_values")
    nodes = graph.get("nodes")
    _require(isinstance(nodes, list), f"{what}: no node list")
    _require(
        len(nodes) <= limits.max_nodes,
        f"{what}: {len(nodes)} nodes, above the limit of {limits.max_nodes}",
    )
    ops: Counter[str] = Counter()
    for index, node in enumerate(nodes):
        ops[_check_node(node, index, what)] += 1
    for name, meta in tensors.items():
        _check_tensor_meta(meta, f"{what}: tensor {name!r}", limits)
    summary = _summarize(gm, tensors, ops, len(nodes), what, limits)
    for node in nodes:
        node["metadata"] = {}
    return doc, summary


def _check_call_graph(entries: Any, what: str) -> None:
    _require(isinstance(entries, list), f"{what}: malformed module_call_graph")
    for where, key, value in _walk(entries, f"{what}.module_call_graph"):
        if key in ("in_spec", "out_spec") and value is not None:
            try:
                spec = json.loads(value)
            except (TypeError, ValueError, RecursionError):
                raise _reject(f"{where}: malformed {key}") from None
            for _, inner_key, inner in _walk(spec, where):
                if inner_key == "type" and inner not in _TREESPEC_TYPES:
                    raise _reject(f"{where}: {key} names the Python type {inner!r}")


def _check_node(node: Any, index: int, what: str) -> str:
    _require(isinstance(node, dict), f"{what}: node #{index} is not an object")
    name = node.get("name", f"#{index}")
    target: Any = node.get("target")
    where = f"{what}: node {name!r}"
    _require(isinstance(target, str), f"{where} has no target")
    if not is_allowed(target):
        if target.startswith("torch.ops.higher_order."):
            kind = "a higher-order operator"
        elif target.startswith("torch.ops.aten."):
            kind = "an ATen operator that is not on the allow-list"
        elif target.startswith("torch.ops.") or target.startswith("#"):
            kind = "a custom operator"
        else:
            kind = "a Python callable"
        raise _reject(f"{where} calls {target}: {kind}; refused (see docs/plans.md)")
    inputs = node.get("inputs", [])
    _require(isinstance(inputs, list), f"{where}: malformed inputs")
    for item in inputs:
        _require(isinstance(item, dict), f"{where}: malformed input")
        kind, _ = _one_key(item.get("arg"), f"{where} input {item.get('name')!r}")
        if kind in _REFUSED_ARG_KINDS:
            raise _reject(f"{where} takes {_REFUSED_ARG_KINDS[kind]}; refused")
        _require(kind in _ARG_KINDS, f"{where} takes an argument of unknown kind {kind!r}")
    outputs = node.get("outputs", [])
    _require(isinstance(outputs, list), f"{where}: malformed outputs")
    for item in outputs:
        kind, _ = _one_key(item, f"{where} output")
        if kind in _REFUSED_ARG_KINDS:
            raise _reject(f"{where} returns {_REFUSED_ARG_KINDS[kind]}; refused")
    op = str(target)
    if op.startswith("torch.ops."):
        return op[len("torch.ops.") :].rsplit(".", 1)[0]
    return op.replace("_operator.", "size ")


def _check_tensor_meta(meta: Any, where: str, limits: Limits) -> None:
    _require(isinstance(meta, dict), f"{where}: malformed")
    dims = _dims(meta.get("sizes"), where)
    fixed = math.prod(d for d in dims if d is not None)
    _require(
        fixed <= limits.max_tensor_elements,
        f"{where}: {fixed} elements, above the limit of {limits.max_tensor_elements}",
    )


def _dtype(meta: dict[str, Any], where: str) -> str:
    from torch._export.serde.schema import ScalarType  # the serializer's own enum

    try:
        name = ScalarType(int(meta.get("dtype", -1))).name
    except (TypeError, ValueError):
        raise _reject(f"{where}: unknown dtype code {meta.get('dtype')!r}") from None
    if name not in _DTYPES:
        raise _reject(f"{where}: dtype {name.lower()} cannot travel in a plan")
    return _DTYPES[name]


def _tensor_info(tensors: dict[str, Any], arg: Any, where: str) -> tuple[str, TensorInfo]:
    kind, value = _one_key(arg, where)
    _require(kind == "as_tensor" and isinstance(value, dict), f"{where}: not a tensor")
    name = value.get("name")
    meta: Any = tensors.get(name) if isinstance(name, str) else None
    if not isinstance(meta, dict):
        raise _reject(f"{where}: tensor {name!r} is not described")
    return str(name), TensorInfo(_dtype(meta, where), _dims(meta.get("sizes"), where))


def _summarize(
    gm: dict[str, Any],
    tensors: dict[str, Any],
    ops: Counter[str],
    num_nodes: int,
    what: str,
    limits: Limits,
) -> GraphSummary:
    signature: Any = gm.get("signature")
    _require(isinstance(signature, dict), f"{what}: no signature")
    _require(
        isinstance(signature.get("input_specs"), list)
        and isinstance(signature.get("output_specs"), list),
        f"{what}: malformed signature",
    )
    state: list[TensorSignature] = []
    constants: list[TensorSignature] = []
    trainable: set[str] = set()
    inputs: list[TensorInfo] = []
    for spec in signature["input_specs"]:
        kind, body = _one_key(spec, f"{what}: an input spec")
        if kind not in _INPUT_KINDS:
            name = body.get("name") if isinstance(body, dict) else None
            raise _reject(
                f"{what}: input {name!r} of kind {kind!r} refused (plans take tensors: "
                "parameters, buffers, tensor constants and one input)"
            )
        _require(isinstance(body, dict), f"{what}: malformed {kind} input")
        if kind == "user_input":
            inputs.append(_tensor_info(tensors, body.get("arg"), f"{what}: the input")[1])
            continue
        arg = body.get("arg")
        _require(isinstance(arg, dict), f"{what}: malformed {kind} input")
        name_key = {"parameter": "parameter_name", "buffer": "buffer_name"}.get(
            kind, "tensor_constant_name"
        )
        fqn = body.get(name_key)
        _require(isinstance(fqn, str) and 0 < len(fqn) <= 512, f"{what}: bad {kind} name")
        _, info = _tensor_info(tensors, {"as_tensor": arg}, f"{what}: {kind} {fqn!r}")
        if any(d is None for d in info.shape):
            raise _reject(f"{what}: {kind} {fqn!r} has a dynamic size")
        sig = TensorSignature(fqn, info.dtype, tuple(int(d) for d in info.shape if d is not None))
        if kind == "parameter":
            trainable.add(fqn)
        if kind == "tensor_constant" or (kind == "buffer" and body.get("persistent") is False):
            constants.append(sig)
        else:
            state.append(sig)
    _require(len(inputs) == 1, f"{what}: a plan takes exactly one input tensor, not {len(inputs)}")
    (model_input,) = inputs
    _require(
        bool(model_input.shape) and model_input.shape[0] is None,
        f"{what}: the input's first dimension must be the dynamic batch dimension",
    )
    _require(
        all(d is not None for d in model_input.shape[1:]),
        f"{what}: only the input's batch dimension may be dynamic",
    )
    per_example = math.prod(d for d in model_input.shape[1:] if d is not None)
    _require(
        per_example <= limits.max_example_elements,
        f"{what}: one example has {per_example} elements, above the limit",
    )
    outputs: list[TensorInfo] = []
    mutated: list[str] = []
    for spec in signature["output_specs"]:
        kind, body = _one_key(spec, f"{what}: an output spec")
        if kind not in _OUTPUT_KINDS:
            raise _reject(f"{what}: output of kind {kind!r} refused")
        _require(isinstance(body, dict), f"{what}: malformed {kind} output")
        if kind == "user_output":
            outputs.append(_tensor_info(tensors, body.get("arg"), f"{what}: the output")[1])
        else:
            mutated.append(str(body.get("buffer_name")))
    _require(len(outputs) == 1, f"{what}: a plan returns exactly one tensor, not {len(outputs)}")
    state_bytes = sum(t.num_bytes for t in state)
    _require(
        state_bytes <= limits.max_state_bytes,
        f"{what}: parameters and buffers take {state_bytes} bytes, above the limit of "
        f"{limits.max_state_bytes}",
    )
    constant_bytes = sum(t.num_bytes for t in constants)
    _require(
        constant_bytes <= limits.max_constant_bytes,
        f"{what}: constants take {constant_bytes} bytes, above the limit",
    )
    return GraphSummary(
        ops=ops,
        input=model_input,
        output=outputs[0],
        state=tuple(state),
        trainable=frozenset(trainable),
        constants=tuple(constants),
        nodes=num_nodes,
        mutated_buffers=tuple(mutated),
    )
