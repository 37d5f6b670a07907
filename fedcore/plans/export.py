"""Exporting a model as a plan (the data scientist's side): ``export_plan(module, example)``.

The module is exported twice with ``torch.export`` (training IR, dynamic batch dimension):
once in training mode, once in evaluation mode, so dropout and batch normalization behave
on the worker as they would in the original. Each graph travels as the JSON torch's export
serializer writes, with node metadata (stack traces, source paths) dropped and keys sorted,
so the same model gives the same bytes, and the same hash, on every machine. The weights
are the module's ``state_dict`` as numpy arrays; tensor constants and non-persistent
buffers go into the program as a typed raw payload. Nothing is pickled.

The exporter checks its own result with the worker's verifier, so a plan that a worker
would refuse fails here, with the same message.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.codec import iter_chunks, make_header
from fedcore.errors import PlanError, PlanRejectedError
from fedcore.losses import LOSSES
from fedcore.models import get_weights
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

from .format import FORMAT_VERSION, Plan, plan_hash
from .load import verify_program
from .verify import MAX_BATCH

__all__ = ["MAX_BATCH", "export_plan"]


def _graph_json(module: nn.Module, example: torch.Tensor, *, training: bool) -> tuple[bytes, Any]:
    from torch._export.serde.serialize import serialize
    from torch.export import Dim, export

    module.train(training)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes about its own internals
        try:
            program = export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:
            raise PlanError(
                f"torch.export cannot export this model ({'training' if training else 'eval'} "
                f"mode): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        for name, value in program.constants.items():
            if not isinstance(value, torch.Tensor):
                raise PlanError(
                    f"the model holds {name!r}, a {type(value).__name__}: plans carry tensors only"
                )
        artifact = serialize(program)
    doc = json.loads(artifact.exported_program)
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return raw, program.constants


def _constants(values: dict[str, Any]) -> tuple[pb.PayloadHeader, bytes]:
    arrays: Weights = {
        name: value.detach().cpu().contiguous().numpy() for name, value in sorted(values.items())
    }
    if not arrays:
        return pb.PayloadHeader(), b""
    chunk = max(1, sum(a.nbytes for a in arrays.values()))
    return make_header(arrays, chunk), b"".join(iter_chunks(arrays, chunk))


def export_plan(
    module: nn.Module, example: torch.Tensor, *, loss: str = "cross_entropy", name: str = ""
) -> Plan:
    """Export ``module`` as a plan trained with ``loss`` (see :data:`fedcore.losses.LOSSES`).

    Args:
        module: the model; its forward takes one tensor whose first dimension is the batch.
        example: an input batch of at least 2 examples (shapes, dtypes; values unused).
        loss: the loss the worker's training loop applies to the output.
        name: what the plan is called in ``fed-plan show`` and logs.

    Raises:
        PlanError: the model cannot be exported, or the result would be refused by a worker
            (the message says which operation or object).
    """
    if loss not in LOSSES:
        raise PlanError(f"unknown loss {loss!r}; fedcore's losses: {', '.join(LOSSES)}")
    if example.dim() < 1 or example.shape[0] < 2:
        raise PlanError("the example input needs a batch dimension of at least 2")
    was_training = module.training
    module = module.cpu()
    example = example.cpu()
    try:
        train_graph, constants = _graph_json(module, example, training=True)
        eval_graph, _ = _graph_json(module, example, training=False)
    finally:
        module.train(was_training)
    header, data = _constants(constants)
    program = pb.PlanProgram(
        format_version=FORMAT_VERSION,
        name=name or type(module).__name__,
        train_graph=train_graph,
        eval_graph=eval_graph,
        loss=loss,
        constants=header,
        constants_data=data,
    )
    program.hash = plan_hash(program)
    try:
        verified = verify_program(program)
    except PlanRejectedError as exc:
        raise PlanError(f"a worker would refuse this plan: {exc}") from None
    # The worker's module proves it can be built, and fixes the weights' wire order.
    original = get_weights(module)
    order = verified.build().state_dict()
    weights = {k: np.array(original[k], copy=True) for k in order}
    return Plan(program, weights)
