"""The worker's policy guard: the runtime asks it about every task, and before every release.

It joins the pieces of :mod:`fedcore.policy` for one worker: the data owner's
:class:`~fedcore.policy.Policy`, the worker's own facts (its size, its DP-SGD settings, the
coordinator's TLS identity) and the silo's :class:`~fedcore.policy.PrivacyLedger`.

* :meth:`PolicyGuard.review` when a task arrives: a refusal is sent at once, and nothing of
  the task runs (no training, no secure-aggregation keys).
* :meth:`PolicyGuard.pay` just before an update leaves: the check again, then the round's
  privacy charge written to the ledger, atomically against the budget. Only then is the
  update sent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy.typing as npt

from fedcore.data.metadata import LabelHistogram
from fedcore.errors import PolicyError
from fedcore.policy import (
    Charge,
    PlanRequest,
    Policy,
    PrivacyLedger,
    RecordDPSetup,
    Refusal,
    check,
    check_local_setup,
    epsilon_of,
    noisy_label_histogram,
)
from fedcore.policy.release import LABEL_HISTOGRAM, REPLACE_ONE_SENSITIVITY
from fedcore.privacy.dpsgd import RELATION as DPSGD_RELATION
from fedcore.v1 import fedcore_pb2 as pb

__all__ = ["PolicyGuard"]

log = logging.getLogger("fedcore.worker")


@dataclass
class PolicyGuard:
    """One worker's policy, checked against each task.

    Args:
        policy: the data owner's rules.
        num_examples: the local training set's size (DP-SGD's sampling rate).
        record_dp: this worker's DP-SGD settings, if it trains with DP-SGD.
        coordinator_identity: the name the coordinator's TLS certificate was verified
            against (None without TLS).

    Raises:
        PolicyError: the worker's own set-up breaks its policy (including a coordinator
            identity not among its allowed coordinators), or the policy asks for something
            this worker cannot check (allowed coordinators without TLS).
    """

    policy: Policy
    num_examples: int
    record_dp: RecordDPSetup | None = None
    coordinator_identity: str | None = None

    def __post_init__(self) -> None:
        problem = check_local_setup(self.policy, self.record_dp)
        if problem is not None:
            raise PolicyError(f"{self.policy.source}: {problem.reason}")
        if self.policy.allowed_coordinators is not None and self.coordinator_identity is None:
            raise PolicyError(
                f"{self.policy.source}: [coordinators] allowed needs the coordinator's TLS "
                "identity, and this worker does not connect over TLS; start it with --tls-ca "
                "(the name checked is --tls-server-name, or the host of --server)"
            )
        allowed = self.policy.allowed_coordinators
        if allowed is not None and self.coordinator_identity not in allowed:
            # Checked before connecting: TLS then proves the coordinator holds this name, so
            # a coordinator off the list never sees the hello, the metadata or the histogram.
            raise PolicyError(
                f"{self.policy.source}: [coordinators] allowed lists {', '.join(allowed)}, and "
                f"this worker would connect to {self.coordinator_identity!r} (the name TLS "
                "verifies: --tls-server-name, or the host of --server); nothing was sent"
            )
        budget = self.policy.budget
        self.ledger = PrivacyLedger(budget.ledger, study=budget.study) if budget else None

    def _plan(self, task: pb.Task) -> PlanRequest:
        return PlanRequest.from_task(
            task, record_dp=self.record_dp, coordinator=self.coordinator_identity
        )

    def charges(self, plan: PlanRequest) -> list[Charge] | None:
        """What a fit plan costs the silo, or None when it is not differentially private.

        Client-level DP counts as one Gaussian mechanism at the plan's noise multiplier with
        sampling rate 1 (the silo knows it took part); DP-SGD as ``epochs * ceil(N / batch)``
        steps of rate ``batch / N``, as Opacus accounts them.
        """
        client = plan.client_dp
        if client is not None and client.noise_multiplier is not None:
            z = client.noise_multiplier
            what = f"round {plan.round}: client-level DP"
            if client.min_updates is not None and not plan.secagg:
                # Distributed noise without secure aggregation: the coordinator sees this
                # update with only this worker's share on it, z / sqrt(m) in units of C.
                z /= math.sqrt(client.min_updates)
                what += " (own noise share, seen unmasked)"
            return [Charge(noise_multiplier=z, what=what)]
        if plan.record_dp is not None and self.num_examples > 0:
            batch = max(1, min(plan.batch_size, self.num_examples))
            steps_per_epoch = math.ceil(self.num_examples / batch)
            return [
                Charge(
                    noise_multiplier=plan.record_dp.noise_multiplier,
                    sample_rate=1.0 / steps_per_epoch,
                    steps=max(1, plan.epochs) * steps_per_epoch,
                    what=f"round {plan.round}: DP-SGD",
                    relation=DPSGD_RELATION,
                )
            ]
        return None

    def _epsilon_after(self, plan: PlanRequest) -> float | None:
        budget = self.policy.budget
        if budget is None or self.ledger is None or plan.kind != "fit":
            return None
        charges = self.charges(plan)
        if charges is None:
            return math.inf
        return self.ledger.epsilon_after(charges, delta=budget.delta)

    def review(self, task: pb.Task) -> Refusal | None:
        """The rule ``task`` breaks, or None (reads the ledger: call it off the event loop)."""
        plan = self._plan(task)
        return check(self.policy, plan, epsilon_after=self._epsilon_after(plan))

    def pay(self, task: pb.Task) -> Refusal | None:
        """Check again and charge the round to the ledger; a Refusal means: send nothing."""
        plan = self._plan(task)
        refusal = check(self.policy, plan, epsilon_after=self._epsilon_after(plan))
        if refusal is not None or plan.kind != "fit":
            return refusal
        budget = self.policy.budget
        if budget is None or self.ledger is None:
            return None
        charges = self.charges(plan)
        assert charges is not None  # check() refuses a plan without DP under a budget
        spent = self.ledger.spend(charges, delta=budget.delta, budget=budget.epsilon)
        if spent is None:
            return Refusal(
                "budget",
                f"another worker of this silo spent the rest of study {budget.study!r}'s "
                f"budget (epsilon {budget.epsilon:g}) meanwhile",
            )
        log.info(
            "round %d: silo epsilon for study %r is now %.3f of %g (delta %g)",
            plan.round,
            budget.study,
            spent,
            budget.epsilon,
            budget.delta,
        )
        return None

    def label_histogram(self, labels: npt.ArrayLike) -> LabelHistogram | None:
        """The noisy label histogram this worker may advertise (made once, then reused from
        the ledger), or None when the policy does not release one or the budget is spent."""
        rules = self.policy.dataset
        budget = self.policy.budget
        if not rules.release_label_histogram or budget is None or self.ledger is None:
            return None
        assert rules.label_histogram_noise_multiplier is not None
        assert rules.label_histogram_labels is not None
        noise = rules.label_histogram_noise_multiplier
        num_labels = rules.label_histogram_labels

        def make() -> tuple[dict[str, object], list[Charge]]:
            counts, charge = noisy_label_histogram(
                labels, num_labels=num_labels, noise_multiplier=noise
            )
            return {"counts": list(counts), "noise_std": noise}, [charge]

        stored = self.ledger.release(
            LABEL_HISTOGRAM, make, delta=budget.delta, budget=budget.epsilon
        )
        if stored is None:
            log.warning("not releasing the label histogram: the privacy budget is spent")
            return None
        noise_std = float(stored["noise_std"])
        counts = tuple(float(c) for c in stored["counts"])
        # What this release alone costs (it is also part of the silo's total).
        charge = Charge(noise_multiplier=noise_std / REPLACE_ONE_SENSITIVITY)
        epsilon = epsilon_of([charge], delta=budget.delta)
        return LabelHistogram(counts, noise_std, epsilon, budget.delta)
