"""Plans as verifiable programs: any PyTorch model, no code on the workers.

A data scientist exports a model with :func:`export_plan`: ``torch.export`` graphs of ATen
operations (JSON) plus weights as fedcore's typed raw payload. A worker runs it only after
:func:`verify_program` has checked every node against an allow-list of operations
(:mod:`.allowlist`), bounded every size, propagated shapes with fake tensors and checked
what the graph writes (:mod:`.analysis`); torch's own deserializer then only ever sees
checked JSON and tensors the worker allocated. The plan's hash identifies it in logs,
metrics, checkpoints and a data owner's approvals. See ``docs/plans.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedcore.errors import PlanError, PlanRejectedError

from .format import (
    MODEL_PREFIX,
    Plan,
    model_name_for,
    plan_hash,
    read_plan_file,
    write_plan_file,
)
from .text import escape

if TYPE_CHECKING:
    from .describe import describe_plan
    from .export import export_plan
    from .load import PlanModule, VerifiedPlan, verify_program
    from .verify import GraphSummary, Limits, limits_for

__all__ = [
    "MODEL_PREFIX",
    "GraphSummary",
    "Limits",
    "Plan",
    "PlanError",
    "PlanModule",
    "PlanRejectedError",
    "VerifiedPlan",
    "describe_plan",
    "escape",
    "export_plan",
    "limits_for",
    "model_name_for",
    "plan_hash",
    "read_plan_file",
    "verify_program",
    "write_plan_file",
]


#: What the verifier and the exporter bring (torch's fake tensors, decompositions, sympy:
#: about half a second): loaded on first use, so a worker or coordinator that never sees a
#: plan, and the request queue, start without them.
_LAZY = {
    "describe_plan": ".describe",
    "export_plan": ".export",
    "PlanModule": ".load",
    "VerifiedPlan": ".load",
    "verify_program": ".load",
    "GraphSummary": ".verify",
    "Limits": ".verify",
    "limits_for": ".verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # Under the worker's warm-up lock: two threads importing torch's stacks at once can
        # see a partially initialised module (fedcore.training.TORCH_IMPORTS).
        from fedcore.training import TORCH_IMPORTS

        with TORCH_IMPORTS:
            module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
