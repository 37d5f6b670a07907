"""torch's deserializer, fed only verified JSON and tensors fedcore allocated itself.

Dicts, never bytes, for the state and constants: ``deserialize_torch_artifact`` would fall
back to ``torch.load(weights_only=False)`` on bytes. The JSON has passed
:func:`~.verify.verify_graph` (and its shape expressions were reprinted by fedcore).
"""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.errors import PlanRejectedError
from fedcore.training import TORCH_IMPORTS
from fedcore.weights import Weights

from .text import one_line
from .verify import GraphSummary

__all__ = ["deserialize_program"]

# torch's deserializer keeps per-call state in a module global: one call at a time.
_DESERIALIZE = threading.Lock()


def _zeros(summary: GraphSummary) -> dict[str, torch.Tensor]:
    """Placeholder state of verified (bounded) shapes; the real weights are loaded later."""
    out: dict[str, torch.Tensor] = {}
    for t in summary.state:
        tensor = torch.zeros(t.shape, dtype=getattr(torch, t.dtype))
        out[t.name] = nn.Parameter(tensor) if t.name in summary.trainable else tensor
    return out


def deserialize_program(
    doc: dict[str, Any], summary: GraphSummary, constants: Weights
) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` of a verified graph (state zero, constants as given).

    Raises:
        PlanRejectedError: torch cannot read it.
    """
    # Imported on first use (over a second of torch's compiler stack that workers and
    # coordinators without plans never need), under the lock the worker's warm-up thread
    # holds: two threads importing torch._dynamo at once see a partially initialised module.
    with TORCH_IMPORTS:
        from torch._export.serde.serialize import SerializedArtifact, deserialize

    artifact = SerializedArtifact(
        json.dumps(doc).encode(),
        _zeros(summary),  # type: ignore[arg-type]
        {name: torch.from_numpy(np.array(a, copy=True)) for name, a in constants.items()},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    with _DESERIALIZE, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes about its own internals
        try:
            return deserialize(artifact)
        except Exception as exc:  # verified JSON torch still cannot read: refuse, never crash
            raise PlanRejectedError(
                f"torch could not rebuild the verified graph: {one_line(exc)}"
            ) from None
