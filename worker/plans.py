"""Shipped plans on the worker: the gate's plan check, and the modules the trainer builds.

:meth:`PlanLibrary.admit` is what the :class:`~.gate.Gate` asks about a task that carries a
plan, in its model check, before anything else of the task is looked at:

1. the policy accepts plans at all (``[plans] accept``);
2. the program passes :func:`fedcore.plans.verify_program` (allow-listed operations,
   bounded sizes, no pickles, custom objects or code; the hash recomputed) and the task
   names it by that hash;
3. this worker does not train with DP-SGD (Opacus cannot train a plan: docs/plans.md);
4. with ``[plans] require-approval``, the data owner approved this hash: an unknown plan is
   queued (:class:`~fedcore.plans.queue.RequestQueue`) and refused as "awaiting approval", a denied
   one is refused with the owner's reason;
5. the weights header matches the program's parameters exactly.

A refusal is a :class:`~fedcore.errors.TaskRefused` (rule ``plans.*``) that reaches the
coordinator; nothing of the task runs. Verified programs are kept by hash, so the trainer
builds the very program the gate verified.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from torch import nn

from fedcore.codec import header_signature
from fedcore.errors import PayloadError, PlanRejectedError, TaskRefused
from fedcore.plan import ModelSpec
from fedcore.plans import MODEL_PREFIX, Limits, VerifiedPlan, verify_program
from fedcore.plans.queue import RequestQueue
from fedcore.policy import PlanRules
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, describe_mismatch

__all__ = ["PlanLibrary"]

log = logging.getLogger("fedcore.worker")

_KEEP = 8  # verified programs kept (a coordinator cannot grow the cache without bound)


def _sorted(signature: ModelSignature) -> ModelSignature:
    return tuple(sorted(signature, key=lambda t: t.name))


class PlanLibrary:
    """The plans this worker verified, by hash.

    Args:
        rules: the policy's ``[plans]`` section.
        max_model_bytes: the largest parameters-and-buffers a plan may have.
        dpsgd: this worker trains with DP-SGD (plans are then refused).
    """

    def __init__(self, rules: PlanRules, *, max_model_bytes: int, dpsgd: bool = False) -> None:
        self.rules = rules
        self.limits = Limits(max_state_bytes=max_model_bytes)
        self.dpsgd = dpsgd
        self.queue = (
            RequestQueue(rules.requests)
            if rules.require_approval and rules.requests is not None
            else None
        )
        self._verified: OrderedDict[str, VerifiedPlan] = OrderedDict()
        self._lock = threading.Lock()

    def _verify(self, program: pb.PlanProgram) -> VerifiedPlan:
        with self._lock:
            cached = self._verified.get(program.hash)
        # A cached program is reused only if it is the same program, byte for byte.
        if cached is not None and cached.program == program:
            return cached
        try:
            verified = verify_program(program, limits=self.limits)
        except PlanRejectedError as exc:
            raise TaskRefused("plans.verification", str(exc)) from None
        with self._lock:
            self._verified[verified.hash] = verified
            while len(self._verified) > _KEEP:
                self._verified.popitem(last=False)
        return verified

    def admit(self, task: pb.Task) -> tuple[ModelSpec, ModelSignature]:
        """The model spec and signature of ``task``'s verified, approved plan.

        Raises:
            TaskRefused: the rule the plan breaks, and why.
        """
        if not self.rules.accept:
            raise TaskRefused("plans.accept", "this worker runs no shipped plans", by="policy")
        verified = self._verify(task.plan)
        if task.model.name != verified.model_name:
            raise TaskRefused(
                "plans.hash",
                f"the task names model {task.model.name[:40]!r} but carries plan "
                f"{verified.hash[:16]}",
            )
        if self.dpsgd and task.kind == pb.TASK_KIND_FIT:
            raise TaskRefused(
                "plans.dpsgd",
                "this worker trains with DP-SGD, which cannot train a plan (Opacus needs layer "
                "modules; a plan is a graph of ATen operations); federate a registered model",
            )
        self._check_approval(verified, task)
        try:
            declared = header_signature(task.weights)
        except (KeyError, ValueError, PayloadError) as exc:
            raise TaskRefused("model.weights", f"the weights header is malformed: {exc}") from None
        # The graph lists parameters in its own order; the wire order is the built module's.
        problem = describe_mismatch(_sorted(verified.signature), _sorted(declared))
        if problem is not None:
            raise TaskRefused("model.weights", f"the weights sent do not fit the plan: {problem}")
        return ModelSpec(verified.model_name), declared

    def _check_approval(self, verified: VerifiedPlan, task: pb.Task) -> None:
        if self.queue is None:
            return
        record = self.queue.get(verified.hash)
        if record is None:
            record = self.queue.submit(verified.program, task)
            log.warning(
                "plan %s (%r) awaits the data owner's approval: fed-worker requests show %s",
                verified.hash[:16],
                verified.program.name,
                verified.hash[:16],
            )
        if record.status == "approved":
            return
        if record.status == "denied":
            raise TaskRefused(
                "plans.approval",
                f"plan {verified.hash[:16]} was denied by the data owner"
                + (f": {record.reason}" if record.reason else ""),
                by="policy",
            )
        raise TaskRefused(
            "plans.approval",
            f"awaiting approval: plan {verified.hash[:16]} ({verified.program.name!r}) is in "
            "the data owner's request queue (fed-worker requests approve)",
            by="policy",
        )

    def build(self, spec: ModelSpec) -> nn.Module | None:
        """A fresh module for a plan this library verified; None for other models."""
        if not spec.name.startswith(MODEL_PREFIX):
            return None
        with self._lock:
            verified = self._verified.get(spec.name[len(MODEL_PREFIX) :])
        if verified is None:
            return None
        return verified.build()
