"""The plan format: a :class:`PlanProgram` (graphs, loss, constants) plus weights, its hash,
and plan files.

The hash is SHA-256 over the program's canonical bytes: a domain tag, then every field
length-prefixed in a fixed order (format version, name, training graph, evaluation graph,
loss, the constants' signature, the constants' bytes). It covers what the worker runs,
not the weights, which change every round; an approval is pinned to it.

A plan file (``fed-plan export``) is the protobuf ``PlanFile``: the program and its initial
weights as fedcore's typed raw payload. Nothing in either is pickled.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from fedcore.codec import iter_chunks, make_header, weights_from_header_and_chunks
from fedcore.errors import PayloadError, PlanError, PlanRejectedError
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

__all__ = [
    "FORMAT_VERSION",
    "MODEL_PREFIX",
    "Plan",
    "PlanProgram",
    "constants_of",
    "model_name_for",
    "plan_hash",
    "read_plan_file",
    "write_plan_file",
]

FORMAT_VERSION = 1
#: A shipped plan's model name is this prefix and its hash (the name of no registered model).
MODEL_PREFIX = "plan-"
_DOMAIN = b"fedcore-plan\x00"

PlanProgram = pb.PlanProgram


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def plan_hash(program: pb.PlanProgram) -> str:
    """Hex SHA-256 of ``program``'s canonical bytes (its ``hash`` field is ignored)."""
    h = hashlib.sha256(_DOMAIN)
    h.update(_field(struct.pack(">I", program.format_version)))
    h.update(_field(program.name.encode()))
    h.update(_field(program.train_graph))
    h.update(_field(program.eval_graph))
    h.update(_field(program.loss.encode()))
    constants = ";".join(
        f"{t.name}|{t.dtype}|{','.join(map(str, t.shape))}" for t in program.constants.tensors
    )
    h.update(_field(constants.encode()))
    h.update(_field(program.constants_data))
    return h.hexdigest()


def model_name_for(digest: str) -> str:
    """The model name tasks carry for the plan of hash ``digest``."""
    return MODEL_PREFIX + digest


def constants_of(program: pb.PlanProgram, *, max_bytes: int) -> Weights:
    """The program's tensor constants, decoded and checked like any payload."""
    header = program.constants
    if not header.tensors:
        if program.constants_data:
            raise PlanRejectedError("the plan has constant bytes but declares no constants")
        return {}
    try:
        return weights_from_header_and_chunks(
            pb.PayloadHeader(
                tensors=header.tensors,
                total_bytes=header.total_bytes,
                chunk_bytes=max(1, header.total_bytes),
            ),
            [program.constants_data],
            max_bytes=max_bytes,
        )
    except PayloadError as exc:
        raise PlanRejectedError(f"the plan's constants: {exc}") from None


@dataclass(frozen=True)
class Plan:
    """A program and weights for it (initial weights from an export, or a round's)."""

    program: pb.PlanProgram
    weights: Weights

    @property
    def hash(self) -> str:
        return self.program.hash

    @property
    def model_name(self) -> str:
        return model_name_for(self.program.hash)


def write_plan_file(plan: Plan, path: Path) -> None:
    """Write ``plan`` as a PlanFile (protobuf; weights as typed raw bytes)."""
    chunk = max(1, sum(a.nbytes for a in plan.weights.values()))
    header = make_header(plan.weights, chunk)
    data = b"".join(iter_chunks(plan.weights, chunk))
    message = pb.PlanFile(program=plan.program, weights=header, weights_data=data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(message.SerializeToString())
    tmp.replace(path)


def read_plan_file(path: Path, *, max_bytes: int) -> Plan:
    """Read a plan file: protobuf only, the weights checked like any received payload.

    Raises:
        PlanError: unreadable, too large, not a plan file, or its hash does not match.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PlanError(f"plan file {path} has {size} bytes, above the limit of {max_bytes}")
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read plan file {path}: {exc.strerror}") from None
    message = pb.PlanFile()
    try:
        message.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError; any parse failure means "not a plan file"
        raise PlanError(f"{path} is not a fedcore plan file (made by fed-plan export)") from None
    if not message.HasField("program") or not message.program.train_graph:
        raise PlanError(f"{path} is not a fedcore plan file (it holds no program)")
    if plan_hash(message.program) != message.program.hash:
        raise PlanError(f"plan file {path} is corrupt: its hash does not match its content")
    header = pb.PayloadHeader()
    header.CopyFrom(message.weights)
    header.chunk_bytes = max(1, header.total_bytes)
    try:
        weights = weights_from_header_and_chunks(header, [message.weights_data], max_bytes=size)
    except PayloadError as exc:
        raise PlanError(f"plan file {path}: its weights are unusable: {exc}") from None
    return Plan(message.program, weights)
