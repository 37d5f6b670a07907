"""Plans as verifiable programs: any PyTorch model, no code on the workers.

A data scientist exports a model with :func:`export_plan`: ``torch.export`` graphs of ATen
operations (JSON) plus weights as fedcore's typed raw payload. A worker runs it only after
:func:`verify_program` has checked every node against an allow-list of operations
(:mod:`.allowlist`), bounded every size, propagated shapes with fake tensors and checked
what the graph writes (:mod:`.analysis`); torch's own deserializer then only ever sees
checked JSON and tensors the worker allocated. The plan's hash identifies it in logs,
metrics, checkpoints and a data owner's approvals. See ``docs/plans.md``.
"""

from fedcore.errors import PlanError, PlanRejectedError

from .describe import describe_plan
from .export import export_plan
from .format import (
    MODEL_PREFIX,
    Plan,
    model_name_for,
    plan_hash,
    read_plan_file,
    write_plan_file,
)
from .load import PlanModule, VerifiedPlan, verify_program
from .text import escape
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
