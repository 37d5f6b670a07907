"""The pure policy check: does a plan keep a worker's policy? ``check(policy, plan)``.

:class:`PlanRequest` is what a plan asks of the worker, read from the Task (model, size,
epochs, secure aggregation, client-level DP) plus the worker's own record-level DP-SGD
settings. :func:`check` compares it with the :class:`~.model.Policy` and returns the first
broken rule as a :class:`Refusal`, or None. It does no I/O: the privacy budget enters as the
epsilon the worker's ledger says the plan would bring the silo to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcore.v1 import fedcore_pb2 as pb

from .model import Policy

__all__ = [
    "DP_CLIP_KEY",
    "DP_MIN_UPDATES_KEY",
    "DP_NOISE_MULTIPLIER_KEY",
    "ClientDPRequest",
    "PlanRequest",
    "RecordDPSetup",
    "Refusal",
    "check",
    "check_local_setup",
]

#: Plan keys (``TrainConfig.extra``) of client-level DP: the L2 norm each update is clipped to,
#: and the noise multiplier z of the Gaussian noise added to the sum (std z * clip).
DP_CLIP_KEY = "dp.clip_norm"
DP_NOISE_MULTIPLIER_KEY = "dp.noise_multiplier"
DP_MIN_UPDATES_KEY = "dp.min_updates"


@dataclass(frozen=True)
class ClientDPRequest:
    """Client-level DP as the plan states it (``noise_multiplier`` None: not stated)."""

    clip_norm: float
    noise_multiplier: float | None
    min_updates: int | None = None  # distributed mode: the m of the worker's noise share


@dataclass(frozen=True)
class RecordDPSetup:
    """This worker's own record-level DP-SGD settings."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class PlanRequest:
    """What one task asks of the worker."""

    kind: str  # "fit" or "evaluate"
    round: int
    model: str
    parameters: int
    epochs: int = 0
    batch_size: int = 0
    secagg: bool = False
    client_dp: ClientDPRequest | None = None
    record_dp: RecordDPSetup | None = None
    coordinator: str | None = None  # the coordinator's TLS identity, when known
    is_plan: bool = False  # a model shipped as a program: [plans] rules, not [models] allowed

    @property
    def is_dp(self) -> bool:
        return (
            self.client_dp is not None and self.client_dp.noise_multiplier is not None
        ) or self.record_dp is not None

    @classmethod
    def from_task(
        cls,
        task: pb.Task,
        *,
        record_dp: RecordDPSetup | None = None,
        coordinator: str | None = None,
    ) -> PlanRequest:
        """Read a Task (the weights' header gives the parameter count: nothing is built)."""
        parameters = sum(math.prod(t.shape) for t in task.weights.tensors)
        fit = task.kind == pb.TASK_KIND_FIT
        client_dp = None
        extra = task.train.extra
        if fit and DP_CLIP_KEY in extra:
            noise = extra.get(DP_NOISE_MULTIPLIER_KEY)
            m = extra.get(DP_MIN_UPDATES_KEY)
            client_dp = ClientDPRequest(
                float(extra[DP_CLIP_KEY]),
                # A multiplier of 0 (or less, or NaN) is no noise at all.
                float(noise) if noise is not None and float(noise) > 0 else None,
                None if m is None else max(1, int(m)),
            )
        return cls(
            kind="fit" if fit else "evaluate",
            round=task.round,
            model=task.model.name,
            parameters=parameters,
            epochs=task.train.epochs if fit else 0,
            batch_size=task.train.batch_size if fit else 0,
            secagg=task.HasField("secagg"),
            client_dp=client_dp,
            record_dp=record_dp if fit else None,
            coordinator=coordinator,
            is_plan=task.HasField("plan"),
        )


@dataclass(frozen=True)
class Refusal:
    """A broken rule: ``rule`` names it (``"secure-aggregation.required"``), ``reason`` says
    what the plan did and what the coordinator would have to change."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"refused by the worker's policy [{self.rule}]: {self.reason}"


def check(
    policy: Policy, plan: PlanRequest, *, epsilon_after: float | None = None
) -> Refusal | None:
    """The first rule of ``policy`` that ``plan`` breaks, or None.

    Args:
        epsilon_after: the silo's epsilon (at the budget's delta) if it ran this plan, from
            its ledger (``math.inf`` for a release without DP); needed when the policy has a
            budget and the plan is a fit.
    """
    if (
        policy.allowed_coordinators is not None
        and plan.coordinator not in policy.allowed_coordinators
    ):
        who = plan.coordinator or "a coordinator without a TLS identity"
        return Refusal(
            "coordinators.allowed",
            f"{who} is not among the coordinators this worker trains for "
            f"({', '.join(policy.allowed_coordinators)})",
        )
    models = policy.models
    # A shipped plan is judged by its verification and approval (worker/plans.py).
    if models.allowed is not None and plan.model not in models.allowed and not plan.is_plan:
        return Refusal(
            "models.allowed",
            f"the plan uses model {plan.model!r}; this worker accepts only "
            f"{', '.join(models.allowed)}",
        )
    if models.max_parameters is not None and plan.parameters > models.max_parameters:
        return Refusal(
            "models.max-parameters",
            f"model {plan.model!r} has {plan.parameters:,} parameters, above this worker's "
            f"ceiling of {models.max_parameters:,}; use a smaller model",
        )
    if plan.kind != "fit":
        if not policy.evaluation_allowed:
            why = (
                " (its policy requires DP or keeps a budget, and exact metrics are a release "
                "of its data)"
                if policy.private
                else ""
            )
            return Refusal(
                "training.allow-evaluation",
                f"this worker does not run federated evaluation{why}; evaluate centrally "
                "(--eval-data) or with --fed-eval-every 0",
            )
        return None
    return _check_fit(policy, plan, epsilon_after)


def check_local_setup(policy: Policy, record_dp: RecordDPSetup | None) -> Refusal | None:
    """Rules the worker's own settings break whatever the plan (checked once, at start)."""
    if record_dp is not None:
        return _check_dpsgd(policy, record_dp)
    if policy.privacy.require_dp == "record-level":
        return _check_required_dp(policy, PlanRequest(kind="fit", round=0, model="", parameters=0))
    return None


def _check_fit(policy: Policy, plan: PlanRequest, epsilon_after: float | None) -> Refusal | None:
    max_epochs = policy.training.epochs_limit
    if plan.epochs > max_epochs:
        return Refusal(
            "training.max-epochs",
            f"the plan asks for {plan.epochs} local epochs, this worker allows at most "
            f"{max_epochs}; lower --epochs",
        )
    privacy = policy.privacy
    if privacy.require_secagg and not plan.secagg:
        return Refusal(
            "secure-aggregation.required",
            "the plan asks for an unmasked update; this worker only sends updates under "
            "secure aggregation (start the coordinator with --secagg)",
        )
    client = plan.client_dp
    if client is not None:
        if privacy.max_clip_norm is not None and client.clip_norm > privacy.max_clip_norm:
            return Refusal(
                "differential-privacy.max-clip-norm",
                f"the plan clips updates to L2 norm {client.clip_norm:g}, this worker allows at "
                f"most {privacy.max_clip_norm:g}",
            )
        if privacy.min_noise_multiplier is not None:
            if client.noise_multiplier is None:
                return Refusal(
                    "differential-privacy.min-noise-multiplier",
                    "the plan clips updates but does not state its noise multiplier; this "
                    f"worker needs at least {privacy.min_noise_multiplier:g}",
                )
            if client.noise_multiplier < privacy.min_noise_multiplier:
                return Refusal(
                    "differential-privacy.min-noise-multiplier",
                    f"the plan's noise multiplier is {client.noise_multiplier:g}, this worker "
                    f"needs at least {privacy.min_noise_multiplier:g}",
                )
    record = plan.record_dp
    if record is not None:
        refusal = _check_dpsgd(policy, record)
        if refusal is not None:
            return refusal
    refusal = _check_required_dp(policy, plan)
    if refusal is not None:
        return refusal
    budget = policy.budget
    if budget is not None:
        if epsilon_after is None or math.isinf(epsilon_after):
            return Refusal(
                "budget",
                "the plan releases an update without differential privacy, which this "
                f"worker's privacy budget (epsilon {budget.epsilon:g}) cannot account for; "
                "run the federation with client-level DP or train with DP-SGD",
            )
        if epsilon_after > budget.epsilon:
            return Refusal(
                "budget",
                f"this round would bring the silo's epsilon for study {budget.study!r} to "
                f"{epsilon_after:.3g} at delta {budget.delta:g}, over its budget of "
                f"{budget.epsilon:g}; the budget is spent",
            )
    return None


def _check_dpsgd(policy: Policy, record: RecordDPSetup) -> Refusal | None:
    least = policy.privacy.dpsgd_min_noise_multiplier
    if least is not None and record.noise_multiplier < least:
        return Refusal(
            "differential-privacy.dpsgd-min-noise-multiplier",
            f"this worker's DP-SGD noise multiplier is {record.noise_multiplier:g}, its policy "
            f"needs at least {least:g}; raise the worker's DP-SGD noise multiplier",
        )
    most = policy.privacy.dpsgd_max_grad_norm
    if most is not None and record.max_grad_norm > most:
        return Refusal(
            "differential-privacy.dpsgd-max-grad-norm",
            f"this worker's DP-SGD clips gradients to {record.max_grad_norm:g}, its policy "
            f"allows at most {most:g}; lower the worker's DP-SGD clip norm",
        )
    return None


def _check_required_dp(policy: Policy, plan: PlanRequest) -> Refusal | None:
    required = policy.privacy.require_dp
    client_ok = plan.client_dp is not None and plan.client_dp.noise_multiplier is not None
    record_ok = plan.record_dp is not None
    if required == "client-level" and not client_ok:
        return Refusal(
            "differential-privacy.required",
            "this worker only trains under client-level differential privacy; the plan "
            "states no clip norm and noise multiplier (start the coordinator with DP on)",
        )
    if required == "record-level" and not record_ok:
        return Refusal(
            "differential-privacy.required",
            "this worker only trains with record-level DP-SGD, which is not set up here; "
            "start the worker with DP-SGD",
        )
    if required == "either" and not (client_ok or record_ok):
        return Refusal(
            "differential-privacy.required",
            "this worker only trains under differential privacy; the plan uses no "
            "client-level DP and this worker runs no DP-SGD",
        )
    return None
