"""The worker's gate: every task passes it before any work, every result before it leaves.

The coordinator is not trusted (docs/threat-model.md). A :class:`~fedcore.v1.fedcore_pb2.Task`
is a request; :meth:`Gate.admit` turns it into a :class:`CheckedTask` the runtime can trust,
or raises :class:`~fedcore.errors.TaskRefused` naming the rule it breaks. Nothing of a
refused task runs: no model is built, no weights are trained on, no secure-aggregation keys
are made. The checks, in order:

1. **Model** (every kind): the name is in the worker's registry or is the model its data
   owner configured (``--model``; then the hyper-parameters must be equal); its size is
   computed on torch's ``meta`` device (nothing allocated) and must fit
   ``--max-model-bytes``; the weights header must match it exactly. A task that freezes
   part of the model (:mod:`fedcore.frozen`) sends only the trainable weights: they and the
   frozen parameters (their attached header, or the layout of the copy held here under their
   digest) must form the model together, and with a data owner's ``--frozen-weights`` file
   the digest must be that file's (rule ``frozen.weights``).
2. **The task kind's own checks**: fit (training-config bounds, client-level DP,
   secure-aggregation setup) and evaluate; any other kind is refused (rule ``task.kind``).
   The :class:`CheckedTask`'s kind is what the runtime runs: one table of kinds, here.
3. **The data owner's policy** (``--policy``, :class:`~.policy.PolicyGuard`), including
   the privacy budget.
4. **The owner's decision on the job** under ``[jobs] approval = "always"``
   (:class:`~.job_approval.JobApprovals`): last, so a task the rules refuse never reaches
   the owner's queue.

Analytics queries (:mod:`fedcore.analytics`) carry no model: their check is registered with
:meth:`Gate.register_query` (by :class:`~.analytics.QueryResponder`) and run by
:meth:`Gate.admit_query`, which then checks the query's charge against the budget and returns
what the check compiled (:class:`AdmittedQuery`: the answer runs from it, not from a second
parse); the
answer's charge is written to the same ledger as training by :meth:`Gate.release_query`.

Results pass the gate again on the way out (:meth:`Gate.release_fit`,
:meth:`Gate.release_evaluation`): the round's privacy charge is written to the ledger
first, and under a *private* policy (DP required, or a budget kept) no exact statistic of the
data leaves: fit results lose their training metrics, evaluation accuracy is released only
with Gaussian noise that is charged to the budget.

Defaults without a policy file are those of :class:`~fedcore.policy.Policy` (at most 100
epochs, batches of at most 65,536, a learning rate in [1e-6, 10], secure-aggregation groups of
at least 3 with a threshold above half of the group).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from fedcore.codec import header_signature
from fedcore.errors import (
    ConfigError,
    LedgerError,
    ModelError,
    PayloadError,
    ProtocolError,
    TaskRefused,
)
from fedcore.frozen import is_digest
from fedcore.model_catalog import ModelCatalog
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans.queue import RequestQueue, caps_of
from fedcore.policy import Charge, Policy, Refusal
from fedcore.privacy import ClientDP
from fedcore.privacy.client import UNCLIPPED_METRIC
from fedcore.privacy.dpsgd import DPSGD_METRICS
from fedcore.secagg import wire
from fedcore.secagg.client import ClientRules
from fedcore.secagg.messages import RoundSetup
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, describe_mismatch, signature_of, total_bytes

from .frozen import FrozenStore
from .job_approval import JobApprovals
from .plans import PlanLibrary
from .policy import PolicyGuard
from .trainer import EvalOutput, FitOutput

__all__ = [
    "PUBLIC_FIT_METRICS",
    "Admission",
    "AdmittedQuery",
    "CheckedTask",
    "Gate",
    "QueryCheck",
    "TaskCheck",
]

log = logging.getLogger("fedcore.worker")

#: Fit metrics that say nothing about the records beyond what is already accounted: a DP-SGD
#: silo's own epsilon and delta, and the adaptive-clipping bit (central DP, charged by the
#: coordinator's accountant; refused under secure aggregation). Under a private policy these
#: are the only fit metrics that leave the worker.
PUBLIC_FIT_METRICS = frozenset({*DPSGD_METRICS, UNCLIPPED_METRIC})


@dataclass(frozen=True)
class CheckedTask:
    """A task that passed the gate: typed, checked values only.

    Attributes:
        task: the task as received (ids, and the fields a registered kind reads itself).
        kind: ``"fit"``, ``"evaluate"``, or a registered kind's name.
        model / signature: the model to build and its parameters (checked against the header).
        train: fit only: the training config, within the gate's bounds.
        dp: fit only: client-level DP as the worker will apply it (noise share derived here).
        secagg / secagg_rules: the secure round's setup and what this worker requires of it.
    """

    task: pb.Task
    kind: str
    model: ModelSpec
    signature: ModelSignature
    train: TrainConfig | None = None
    dp: ClientDP | None = None
    secagg: RoundSetup | None = None
    secagg_rules: ClientRules | None = None

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def round(self) -> int:
        return self.task.round


@dataclass(frozen=True)
class Admission:
    """What the common checks established, handed to a task kind's check."""

    task: pb.Task
    model: ModelSpec
    signature: ModelSignature
    policy: Policy

    def checked(self, kind: str, **fields: object) -> CheckedTask:
        """A :class:`CheckedTask` of ``kind`` with this admission's model."""
        return CheckedTask(self.task, kind, self.model, self.signature, **fields)  # type: ignore[arg-type]


#: A task kind's check: a CheckedTask, or :class:`TaskRefused`.
TaskCheck = Callable[[Admission], CheckedTask]


class AdmittedQuery(Protocol):
    """What a query's check compiled (its plan, say), which the answer then runs from: the
    admission check and the answer use one compilation (Tumult's "compile once, then
    measure"), never two computations that must agree."""

    @property
    def charge(self) -> Charge:
        """What answering costs this silo's budget."""
        ...


#: An analytics query's check: the compiled query and its charge, or :class:`TaskRefused`.
QueryCheck = Callable[[pb.QueryTask, Policy], AdmittedQuery]


def _refuse(rule: str, reason: str) -> TaskRefused:
    return TaskRefused(rule, reason)


# ---------------------------------------------------------------------- built-in kinds


def _finite(name: str, value: float, low: float, high: float, rule: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise _refuse(
            rule, f"the plan's {name} is {value!r}; this worker accepts [{low:g}, {high:g}]"
        )


def _check_train(config: TrainConfig, policy: Policy) -> None:
    rules = policy.training
    if config.epochs > rules.epochs_limit:
        raise _refuse(
            "training.max-epochs",
            f"the plan asks for {config.epochs} local epochs, this worker allows at most "
            f"{rules.epochs_limit}; lower --epochs",
        )
    if config.batch_size > rules.max_batch_size:
        raise _refuse(
            "training.max-batch-size",
            f"the plan's batch size is {config.batch_size}, this worker allows at most "
            f"{rules.max_batch_size}",
        )
    # A learning rate of ~0 turns a fit into a query of the received weights.
    _finite(
        "learning rate",
        config.learning_rate,
        rules.min_learning_rate,
        rules.max_learning_rate,
        "training.learning-rate",
    )
    _finite("momentum", config.momentum, 0.0, 0.999, "training.momentum")
    _finite("weight decay", config.weight_decay, 0.0, 1.0, "training.weight-decay")
    for key, value in config.extra.items():
        if not math.isfinite(value):
            raise _refuse("training.extra", f"the plan's {key!r} is {value!r}, not a finite number")


def check_fit(admission: Admission) -> CheckedTask:
    """Training config, client-level DP and secure-aggregation setup of a fit task."""
    task, policy = admission.task, admission.policy
    try:
        config = TrainConfig.from_proto(task.train)
    except ConfigError as exc:
        raise _refuse("training.config", str(exc)) from None
    _check_train(config, policy)
    try:
        dp = ClientDP.from_extra(config.extra)
    except ConfigError as exc:
        raise _refuse("differential-privacy.plan", str(exc)) from None
    if dp is not None and dp.distributed:
        dp = _own_noise_share(dp, policy)
    secagg = None
    rules = None
    if task.HasField("secagg"):
        try:
            secagg = wire.setup_from_proto(task.secagg)
        except ProtocolError as exc:
            raise _refuse("secure-aggregation.setup", str(exc)) from None
        if dp is not None and dp.report_unclipped:
            # Under secure aggregation the coordinator must learn only the sum; an exact
            # per-worker bit beside the masked update would be a release of its own.
            raise _refuse(
                "differential-privacy.report-unclipped",
                "the plan asks for this worker's exact clipping bit beside a masked update; "
                "adaptive clipping is not available under secure aggregation",
            )
        rules = ClientRules(
            min_group_size=policy.privacy.min_group_size,
            min_threshold=policy.privacy.min_threshold,
            min_survivors=(dp.min_updates or 0) if dp is not None else 0,
            max_silos=policy.privacy.max_silos,
        )
        if dp is not None and dp.distributed:
            dp = _exact_noise(dp, secagg, admission.signature)
    return admission.checked("fit", train=config, dp=dp, secagg=secagg, secagg_rules=rules)


#: The largest discrete-Gaussian parameter, in ring units, that 64-bit noise carries.
_MAX_RING_SIGMA = 2.0**50


def _exact_noise(dp: ClientDP, setup: RoundSetup, signature: ModelSignature) -> ClientDP:
    """Distributed noise under secure aggregation, drawn exactly on the round's grid: one ring
    unit of this worker's masked input (weight 1 example under DP, as the masking applies)."""
    count = min(1, int(setup.weight_norm))
    if count < 1 or not dp.noise_multiplier:
        return dp  # the masking refuses such a weight; no noise asked
    weight = min(count / setup.weight_norm, 1.0)
    step = 1.0 / (weight * setup.fixed_point.scale)
    size = sum(math.prod(t.shape) for t in signature)  # every parameter: an upper bound
    sigma = dp.noise_multiplier * (dp.clip_norm / step + 2 * math.sqrt(size))
    if sigma / math.sqrt(dp.shares) > _MAX_RING_SIGMA:
        raise _refuse(
            "secure-aggregation.setup",
            f"the round's fixed-point grid ({step:.3g} per unit) is too fine for exact noise of "
            f"multiplier {dp.noise_multiplier:g} at clip {dp.clip_norm:g}; use fewer "
            "--secagg-bits or a smaller noise multiplier",
        )
    return replace(dp, ring_step=step)


def _own_noise_share(dp: ClientDP, policy: Policy) -> ClientDP:
    """Distributed DP sized by this silo's policy (``[training] max-silos``,
    ``honest-silos``), never by the plan's update count alone (issue 22)."""
    network = policy.training.network
    assert dp.min_updates is not None
    if network.max_silos is not None and dp.min_updates > network.max_silos:
        raise TaskRefused(
            "training.max-silos",
            f"the plan shares the noise among at least {dp.min_updates} updates; this silo "
            f"shares noise with at most {network.max_silos} silos",
            by="policy",
        )
    return replace(dp, honest_silos=network.honest_silos)


def check_evaluate(admission: Admission) -> CheckedTask:
    """Evaluation needs nothing beyond the model (the policy says whether it runs at all);
    under a private policy its metrics leave only with noise, so that noise must be set."""
    policy = admission.policy
    z = policy.training.evaluation_noise_multiplier
    if policy.private and policy.evaluation_allowed and z is None:
        raise _refuse(
            "training.allow-evaluation",
            "under this worker's policy evaluation metrics leave only with DP noise, and no "
            "evaluation-noise-multiplier is configured",
        )
    return admission.checked("evaluate")


_CHECKS: Mapping[int, TaskCheck] = {
    pb.TASK_KIND_FIT: check_fit,
    pb.TASK_KIND_EVALUATE: check_evaluate,
}


# ---------------------------------------------------------------------- the gate


class Gate:
    """Admits tasks and releases results for one worker.

    Args:
        catalog: the models this worker builds.
        max_model_bytes: the largest model accepted (``--max-model-bytes``).
        guard: the data owner's policy and ledger (``--policy``); None: the default policy.
        plans: checks shipped plans (:class:`~.plans.PlanLibrary`); None: plans are refused.
        frozen: the frozen parameters held here (default: none yet, kept in memory).
    """

    def __init__(
        self,
        catalog: ModelCatalog,
        *,
        max_model_bytes: int,
        guard: PolicyGuard | None = None,
        plans: PlanLibrary | None = None,
        frozen: FrozenStore | None = None,
    ) -> None:
        self.catalog = catalog
        self.plans = plans
        self.frozen = frozen if frozen is not None else FrozenStore()
        self.max_model_bytes = max_model_bytes
        self.guard = guard
        self.policy = guard.policy if guard is not None else Policy(source="default policy")
        #: The owner's decisions on jobs (``[jobs] approval = "always"``); None: not asked.
        self.jobs: JobApprovals | None = None
        rules = self.policy.plans
        if self.policy.job_approval == "always" and rules.requests is not None:
            self.jobs = JobApprovals(
                RequestQueue(rules.requests, caps_of(rules)),
                coordinator=(guard.coordinator_identity or "") if guard is not None else "",
            )
        self._query_check: QueryCheck | None = None
        # Digests of the global weights this worker has sent a masked input for.
        self._contributed: set[str] = set()

    def register_query(self, check: QueryCheck) -> None:
        """Admit analytics queries when ``check`` passes them (one check per worker)."""
        if self._query_check is not None:
            raise ConfigError("analytics queries already have a check")
        self._query_check = check

    def admit_query(self, task: pb.QueryTask) -> AdmittedQuery:
        """Check an analytics query before anything of it runs, then its charge against the
        budget (reads the ledger: call it off the loop); returns what the check compiled, with
        the charge to release.

        Raises:
            TaskRefused: the rule the query breaks, and why.
        """
        if self._query_check is None:
            raise _refuse(
                "analytics", "this worker answers no analytics queries (it serves no table)"
            )
        admitted = self._query_check(task, self.policy)
        if self.budget_left(admitted.charge)[0] < 0:
            raise _budget_refusal(self.policy)
        if self.jobs is not None:
            self.jobs.check_query(task)
        return admitted

    def budget_left(self, charge: Charge) -> tuple[float, float]:
        """The silo's budget left if ``charge`` were spent (negative: it would overspend), in
        epsilon, and the budget's delta: what a data scientist may see, as it depends on the
        releases asked, not on the rows. Reads the ledger: call it off the loop."""
        budget = self.policy.budget
        if budget is None or self.guard is None or self.guard.ledger is None:
            raise _refuse(
                "budget",
                "analytics queries need a [budget] in the worker's policy, kept in its ledger",
            )
        try:
            after = self.guard.ledger.epsilon_after([charge], delta=budget.delta)
        except LedgerError as exc:
            raise TaskRefused(
                "budget", f"the silo's privacy ledger is unusable: {exc}", by="policy"
            ) from None
        return budget.epsilon - after, budget.delta

    def release_query(self, charge: Charge, task: pb.QueryTask) -> None:
        """Write a query answer's charge to the ledger before the answer leaves (and, under
        ``[jobs] approval = "always"``, use up the owner's approval of ``task``).

        Raises:
            TaskRefused: the budget, or the owner's approval, no longer allows it: send
                nothing.
        """
        if self.jobs is not None:
            self.jobs.use_query(task)
        self._spend(charge)

    # ------------------------------------------------------------------ admission

    def admit(self, task: pb.Task) -> CheckedTask:
        """Check ``task`` before any of it runs (reads the ledger: call it off the loop).

        Raises:
            TaskRefused: the rule the task breaks, and why.
            PayloadError: the task relies on frozen parameters that are not held here, or
                whose cached copy is damaged (the coordinator must learn it from a new
                session's hello).
        """
        check = _CHECKS.get(task.kind)
        if check is None:
            raise _refuse("task.kind", f"this worker runs no tasks of kind {task.kind}")
        spec, signature = self._check_model(task)
        checked = check(Admission(task, spec, signature, self.policy))
        self._check_policy(task)
        if self.jobs is not None:
            self.jobs.check_task(task)
        return checked

    def _check_model(self, task: pb.Task) -> tuple[ModelSpec, ModelSignature]:
        frozen = self._frozen_signature(task)
        if task.HasField("plan"):  # a model shipped as a program: verified, maybe approved
            if self.plans is None:
                raise _refuse("plans.accept", "this worker runs no shipped plans")
            if self.catalog.configured is not None:
                raise _refuse(
                    "model.allowed",
                    f"this worker runs only model {self.catalog.configured.name} (--model); "
                    "it accepts no shipped plans",
                )
            return self.plans.admit(task)
        try:
            spec = ModelSpec.from_proto(task.model)
        except ConfigError as exc:
            raise _refuse("model.params", str(exc)) from None
        try:
            self.catalog.factory(spec)
        except ModelError as exc:
            raise _refuse("model.allowed", str(exc)) from None
        try:
            signature = self.catalog.signature(spec)  # on the meta device: nothing allocated
        except ModelError as exc:
            raise _refuse("model.params", str(exc)) from None
        size = total_bytes(signature)
        if size > self.max_model_bytes:
            raise _refuse(
                "model.max-bytes",
                f"model {spec} has {size:,} bytes of parameters, above this worker's "
                f"--max-model-bytes {self.max_model_bytes:,}",
            )
        try:
            declared = header_signature(task.weights)
        except (KeyError, ValueError, PayloadError) as exc:
            raise _refuse("model.weights", f"the weights header is malformed: {exc}") from None
        if frozen:
            declared = _with_frozen(signature, declared, frozen)
        problem = describe_mismatch(signature, declared)
        if problem is not None:
            raise _refuse("model.weights", f"the weights sent do not fit model {spec}: {problem}")
        return spec, signature

    def _frozen_signature(self, task: pb.Task) -> ModelSignature:
        """The layout of the frozen parameters ``task`` relies on (empty: it freezes none)."""
        if not task.HasField("frozen"):
            return ()
        frozen = task.frozen
        if task.HasField("plan"):
            # A plan's graph trains every parameter it is given; nothing would keep these.
            raise _refuse("frozen.plans", "a shipped plan cannot freeze parameters")
        if not is_digest(frozen.sha256):
            raise _refuse(
                "frozen.weights",
                f"the frozen parameters' digest {frozen.sha256[:80]!r} is not a hex SHA-256",
            )
        pinned = self.frozen.pinned
        if pinned is not None and frozen.sha256 != pinned:
            raise _refuse(
                "frozen.weights",
                f"the plan's frozen parameters (sha256 {frozen.sha256[:12]}) differ from the "
                f"data owner's file {self.frozen.owner_path} (sha256 {pinned[:12]})",
            )
        if frozen.attached:
            try:
                return header_signature(frozen.header)
            except (KeyError, ValueError, PayloadError) as exc:
                raise _refuse(
                    "frozen.weights", f"the frozen parameters' header is malformed: {exc}"
                ) from None
        # Loaded and verified now (and kept for the run): a damaged cache entry is deleted
        # here, so that the worker's next hello does not claim it.
        return signature_of(self.frozen.get(frozen.sha256))

    def _check_policy(self, task: pb.Task) -> None:
        if self.guard is None:
            return
        try:
            refusal = self.guard.review(task)
        except LedgerError as exc:  # fail closed: no ledger, no release
            refusal = Refusal("budget", f"the silo's privacy ledger is unusable: {exc}")
        if refusal is not None:
            raise TaskRefused(refusal.rule, refusal.reason, by="policy")

    # ------------------------------------------------------------------ secure aggregation

    def check_weights(self, checked: CheckedTask, weights: Weights) -> str:
        """The received weights' digest (empty without secure aggregation); refuses a secure
        round over global weights this worker already sent a masked input for.

        Why once per global model version: two secure rounds over the same weights whose
        surviving sets differ by one worker reveal that worker's update as the difference of
        the two sums (retrying with a fresh round id changes nothing). Fresh noise per attempt
        would only help under DP, and secure aggregation must hold without it; so a worker
        contributes at most once per version, and a coordinator that retries a round after
        the unmasking started must select other workers or move the model on.
        """
        if checked.secagg is None:
            return ""  # an unmasked update is visible anyway: nothing to hide by refusing
        digest = weights_digest(weights)
        if checked.task.HasField("frozen"):  # the model version includes its frozen part
            digest = hashlib.sha256(f"{digest}|{checked.task.frozen.sha256}".encode()).hexdigest()
        if digest in self._contributed:
            raise _refuse(
                "secure-aggregation.once-per-model",
                f"this worker already sent a masked update for these global weights "
                f"(digest {digest[:16]}); a second sum over the same weights could isolate "
                "one worker's update",
            )
        return digest

    def record_contribution(self, checked: CheckedTask, digest: str) -> None:
        """Just before a masked input leaves: remember its global weights (checked again)."""
        if digest in self._contributed:
            raise _refuse(
                "secure-aggregation.once-per-model",
                "this worker already sent a masked update for these global weights",
            )
        self._contributed.add(digest)

    # ------------------------------------------------------------------ release

    def release_fit(self, checked: CheckedTask, fit: FitOutput) -> FitOutput:
        """Charge the round to the ledger, then what may leave of ``fit`` (call off the loop).

        Raises:
            TaskRefused: the budget no longer allows the round: send nothing.
        """
        if self.guard is not None:
            try:
                refusal = self.guard.pay(checked.task)
            except LedgerError as exc:
                refusal = Refusal("budget", f"the silo's privacy ledger is unusable: {exc}")
            if refusal is not None:
                raise TaskRefused(refusal.rule, refusal.reason, by="policy")
        if not self.policy.private:
            return fit
        kept = {k: v for k, v in fit.metrics.items() if k in PUBLIC_FIT_METRICS}
        dropped = sorted(set(fit.metrics) - set(kept))
        if dropped:
            log.info("round %d: not releasing training metrics %s", checked.round, dropped)
        return replace(fit, metrics=kept)

    def release_evaluation(self, checked: CheckedTask, ev: EvalOutput) -> EvalOutput:
        """What may leave of an evaluation (call off the loop).

        Under a private policy only the accuracy leaves, as a noisy count of correct
        predictions over a noisy count of examples (Gaussian, std z each: one record changes
        each count by at most one, so the pair is one Gaussian mechanism of multiplier
        z / sqrt 2), charged to the ledger before it leaves. The loss never leaves: one
        record can move it without bound.

        Raises:
            TaskRefused: the budget does not allow the release.
        """
        if not self.policy.private:
            return ev
        z = self.policy.training.evaluation_noise_multiplier
        if z is None:  # the policy parser makes this impossible; fail closed all the same
            raise _refuse("training.allow-evaluation", "no evaluation noise is configured")
        charge = Charge(
            noise_multiplier=z / math.sqrt(2), what=f"round {checked.round}: evaluation"
        )
        self._spend(charge)
        n = ev.num_examples
        accuracy = ev.metrics.get("accuracy")
        rng = np.random.default_rng(secrets.randbits(128))
        noisy_n = n + rng.normal(0.0, z)
        metrics: dict[str, float] = {}
        if accuracy is not None and math.isfinite(accuracy):
            noisy_correct = round(accuracy * n) + rng.normal(0.0, z)
            metrics["accuracy"] = float(min(1.0, max(0.0, noisy_correct / max(noisy_n, 1.0))))
        return EvalOutput(max(1, round(noisy_n)), metrics)

    def _spend(self, charge: Charge) -> None:
        budget = self.policy.budget
        if budget is None or self.guard is None or self.guard.ledger is None:
            return
        try:
            spent = self.guard.ledger.spend([charge], delta=budget.delta, budget=budget.epsilon)
        except LedgerError as exc:
            raise TaskRefused(
                "budget", f"the silo's privacy ledger is unusable: {exc}", by="policy"
            ) from None
        if spent is None:
            raise _budget_refusal(self.policy)
        log.info("%s: silo epsilon for study %r is now %.3f", charge.what, budget.study, spent)


def _budget_refusal(policy: Policy) -> TaskRefused:
    """The one refusal of a release past the budget: its text names the policy's budget only,
    never what was spent or what the release would cost, so it is the same whatever the data
    and whichever release asked (issue 22)."""
    budget = policy.budget
    assert budget is not None
    return TaskRefused(
        "budget",
        f"study {budget.study!r} has too little of its privacy budget left for this release "
        f"(epsilon {budget.epsilon:g} at delta {budget.delta:g}); nothing was released",
        by="policy",
    )


def _with_frozen(
    model: ModelSignature, trainable: ModelSignature, frozen: ModelSignature
) -> ModelSignature:
    """The weights a task sends plus its frozen parameters, in the model's order (names the
    model lacks last, so that the mismatch names them)."""
    both = {t.name for t in trainable} & {t.name for t in frozen}
    if both:
        raise _refuse(
            "frozen.weights",
            f"parameters {sorted(both)[:4]} are both frozen and sent for training",
        )
    by_name = {t.name: t for t in (*trainable, *frozen)}
    known = [by_name.pop(t.name) for t in model if t.name in by_name]
    return (*known, *by_name.values())


def weights_digest(weights: Weights) -> str:
    """SHA-256 of the weights' names, dtypes, shapes and bytes: one global model version."""
    h = hashlib.sha256()
    for name, array in weights.items():
        h.update(f"{name}|{array.dtype.str}|{array.shape};".encode())
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()
