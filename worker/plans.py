"""Shipped plans on the worker: the gate's plan check, and the modules the trainer builds.

:meth:`PlanLibrary.admit` is what the :class:`~.gate.Gate` asks about a task that carries a
plan, in its model check, before anything else of the task is looked at:

1. the policy accepts plans at all (``[plans] accept``);
2. the program passes :func:`fedcore.plans.verify_program` (allow-listed operations,
   bounded sizes, no pickles, custom objects or code; the hash recomputed) and the task
   names it by that hash;
3. this worker does not train with DP-SGD (Opacus cannot train a plan: docs/plans.md);
4. with ``[plans] require-approval``, the data owner approved this hash *under these terms*
   (:class:`~fedcore.plans.queue.Terms`: DP, secure aggregation, epochs, batch size,
   optimizer, learning rate within the approved range, rounds left): a plan or terms not yet
   decided are queued (:class:`~fedcore.plans.queue.RequestQueue`, within its caps) and
   refused as "awaiting approval" naming the request, a denied request with the owner's
   reason;
5. the weights header matches the program's parameters exactly.

A refusal is a :class:`~fedcore.errors.TaskRefused` (rule ``plans.*``) that reaches the
coordinator; nothing of the task runs. Verified programs are kept by hash, so the trainer
builds the very program the gate verified.

After the gate, the library tells the trainer what of a plan's state may leave
(:meth:`PlanLibrary.state`, :mod:`.plan_state`) and builds modules whose graph reads a copy
of each input batch, never the dataset itself (a plan's in-place write lands in the copy).
"""

from __future__ import annotations

import functools
import logging
import shlex
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedcore import plans as plan_api
from fedcore.codec import header_signature
from fedcore.errors import AwaitingApproval, PayloadError, PlanRejectedError, TaskRefused
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans.format import MODEL_PREFIX
from fedcore.plans.queue import PlanRequestRecord, QueueFull, RequestQueue, Terms, caps_of
from fedcore.policy import PlanRules
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, describe_mismatch

from .plan_state import ReleasedState, released_state

if TYPE_CHECKING:
    from fedcore.plans import Limits, VerifiedPlan

__all__ = ["PlanLibrary", "PlanState", "read_only_input"]

log = logging.getLogger("fedcore.worker")

_KEEP = 8  # verified programs kept (a coordinator cannot grow the cache without bound)


def _sorted(signature: ModelSignature) -> ModelSignature:
    return tuple(sorted(signature, key=lambda t: t.name))


def _copy_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def read_only_input(module: nn.Module) -> nn.Module:
    """Make ``module``'s graph read a copy of its input: unshuffled batches are views of the
    dataset, and an in-place write on them would change the silo's data in memory."""
    module.register_forward_pre_hook(_copy_input)
    return module


class PlanState:
    """What of a verified plan's state leaves after training, and what is reset per task.

    Attributes:
        released: :class:`~.plan_state.ReleasedState` (parameters, accepted statistics, the
            buffers sent back as received).
        constants: the plan's constants, restored before every task (a graph may write to
            them; nothing it wrote is kept from one task to the next).
    """

    def __init__(self, released: ReleasedState, constants: Weights) -> None:
        self.released = released
        self.constants = constants

    def upload(self, trained: Weights, received: Weights) -> Weights:
        """The update to send: trained values of what was approved, the received value of
        every other buffer."""
        keep = self.released.released
        return {n: a if n in keep or n not in received else received[n] for n, a in trained.items()}

    def reset(self, module: nn.Module) -> None:
        """Put the plan's constants back as shipped."""
        buffers = dict(module.named_buffers())
        with torch.no_grad():
            for name, array in self.constants.items():
                buffer = buffers.get(name)
                if buffer is not None:
                    buffer.copy_(torch.from_numpy(array.copy()))


class PlanLibrary:
    """The plans this worker verified, by hash.

    Args:
        rules: the policy's ``[plans]`` section.
        max_model_bytes: the largest parameters-and-buffers a plan may have.
        dpsgd: this worker trains with DP-SGD (plans are then refused).
        coordinator: whom this worker trains for (the queue's requests-per-day cap counts by
            it).
    """

    def __init__(
        self, rules: PlanRules, *, max_model_bytes: int, dpsgd: bool = False, coordinator: str = ""
    ) -> None:
        self.rules = rules
        self.max_model_bytes = max_model_bytes
        self.dpsgd = dpsgd
        self.coordinator = coordinator
        self.queue = (
            RequestQueue(rules.requests, caps_of(rules))
            if rules.require_approval and rules.requests is not None
            else None
        )
        self._verified: OrderedDict[str, VerifiedPlan] = OrderedDict()
        self._states: dict[str, PlanState] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def limits(self) -> Limits:
        """The verifier's limits under this worker's policy (built on first use: the verifier
        is loaded only once a plan arrives)."""
        return plan_api.limits_for(self.rules, max_state_bytes=self.max_model_bytes)

    def _verify(self, program: pb.PlanProgram) -> VerifiedPlan:
        with self._lock:
            cached = self._verified.get(program.hash)
        # A cached program is reused only if it is the same program, byte for byte.
        if cached is not None and cached.program == program:
            return cached
        try:
            verified = plan_api.verify_program(program, limits=self.limits)
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
        if task.kind == pb.TASK_KIND_FIT:
            # The verifier bounded the graph at batch 1; the task's batch scales its tensors.
            batch = TrainConfig.from_proto(task.train).batch_size
            from fedcore.plans.bounds import check_batch  # loaded with the verifier

            try:
                check_batch(verified.activation, batch, self.limits.max_activation_bytes)
            except PlanRejectedError as exc:
                raise TaskRefused("plans.verification", str(exc)) from None
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
        terms = Terms.of(task)
        record = self.queue.lookup(verified.hash, terms)
        if record is None:
            record = self._submit(verified, task, terms)
        if record.status == "approved":
            if task.kind == pb.TASK_KIND_FIT:
                if record.rounds_left == 0:
                    raise TaskRefused(
                        "plans.approval",
                        f"the data owner's approval {record.id[:16]} of plan {verified.hash[:16]} "
                        f"covered {record.rounds} round(s), all run; it must be approved again "
                        f"(fed-worker requests approve {record.id[:16]} --rounds N)",
                        by="policy",
                    )
                self.queue.count_round(record)
            return
        if record.status == "denied":
            raise TaskRefused(
                "plans.approval",
                f"plan {verified.hash[:16]} was denied by the data owner"
                + (f": {record.reason}" if record.reason else "")
                + f" (request {record.id[:16]})",
                by="policy",
            )
        raise AwaitingApproval(
            "plans.approval",
            f"awaiting approval: plan {verified.hash[:16]} ({verified.program.name[:60]!r}) is in "
            f"the data owner's request queue as request {record.id[:16]}"
            + self._changed_terms(verified.hash, record)
            + " (fed-worker requests approve)",
            by="policy",
        )

    def _submit(self, verified: VerifiedPlan, task: pb.Task, terms: Terms) -> PlanRequestRecord:
        assert self.queue is not None
        try:
            record = self.queue.submit(verified.program, task, coordinator=self.coordinator)
        except QueueFull as exc:
            raise TaskRefused("plans.queue", str(exc), by="policy") from None
        queue = str(self.queue.root.resolve())
        log.warning(
            "plan %s (%r) awaits the data owner's approval under new terms: "
            "fed-worker requests --queue %s show %s",
            verified.hash[:16],
            verified.program.name[:60],
            shlex.quote(queue),
            record.id[:16],
            extra={
                "event": "plan_request_queued",
                "plan": verified.hash,
                "request": record.id[:16],
                "queue": queue,
            },
        )
        return record

    def _changed_terms(self, digest: str, record: PlanRequestRecord) -> str:
        """Why a plan the owner approved waits again: the terms that changed."""
        approved = (
            [r for r in self.queue.for_plan(digest) if r.status == "approved"] if self.queue else []
        )
        if not approved:
            return ""
        before = approved[-1]
        changed = "; ".join(record.terms.differences(before.terms)[:4])
        return (
            f": the owner approved it (request {before.id[:16]}) under other terms, and these "
            f"make a new request ({changed})"
        )

    def _get(self, spec: ModelSpec) -> VerifiedPlan | None:
        if not spec.name.startswith(MODEL_PREFIX):
            return None
        with self._lock:
            return self._verified.get(spec.name[len(MODEL_PREFIX) :])

    def verified(self, spec: ModelSpec) -> VerifiedPlan | None:
        """The verified plan ``spec`` names; None for other models."""
        return self._get(spec)

    def build(self, spec: ModelSpec) -> nn.Module | None:
        """A fresh module for a plan this library verified (its graph reads a copy of its
        input); None for other models."""
        verified = self._get(spec)
        return None if verified is None else read_only_input(verified.build())

    def state(self, spec: ModelSpec) -> PlanState | None:
        """What of the plan's state may leave, and its constants; None for other models."""
        verified = self._get(spec)
        if verified is None:
            return None
        with self._lock:
            known = self._states.get(verified.hash)
        if known is not None:
            return known
        made = plan_state(verified, self.rules.accept_buffers)
        if made.released.withheld:
            log.warning(
                "plan %s: buffers %s are not of an accepted kind (%s): they are sent back as "
                "received, never as trained",
                verified.hash[:16],
                ", ".join(repr(n[:60]) for n in made.released.withheld[:8]),
                ", ".join(self.rules.accept_buffers) or "none accepted",
            )
        with self._lock:
            self._states[verified.hash] = made
            while len(self._states) > _KEEP:
                self._states.pop(next(iter(self._states)))
        return made


def plan_state(verified: VerifiedPlan, accept: tuple[str, ...]) -> PlanState:
    """The :class:`PlanState` of a verified plan under the accepted buffer kinds."""
    summary = verified.summary
    buffers = {
        t.name: (t.dtype, t.shape == ()) for t in summary.state if t.name not in summary.trainable
    }
    try:
        released = released_state(
            verified.program, parameters=summary.trainable, buffers=buffers, accept=accept
        )
    except PlanRejectedError as exc:
        raise TaskRefused("plans.verification", str(exc)) from None
    return PlanState(released, verified.constants)
