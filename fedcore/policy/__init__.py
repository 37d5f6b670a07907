"""Data owners stay in control: a worker's policy, its pure check, and the silo's ledger.

* :mod:`.model` parses ``policy.toml`` into a :class:`Policy` (unknown keys are errors).
* :mod:`.check` is the pure ``check(policy, plan) -> Refusal | None``.
* :mod:`.ledger` is the silo's privacy ledger on its own disk (dp-accounting's RDP
  accountant, atomic writes).
* :mod:`.release` makes the label histogram a worker may advertise, with DP noise.

The worker runtime only calls them (``fedcore.worker.policy.PolicyGuard``).
"""

from __future__ import annotations

from .check import (
    ClientDPRequest,
    PlanRequest,
    RecordDPSetup,
    Refusal,
    check,
    check_local_setup,
)
from .ledger import Charge, PrivacyLedger, epsilon_of
from .model import PlanRules, Policy, load_policy, parse_policy
from .release import noisy_label_histogram

__all__ = [
    "Charge",
    "ClientDPRequest",
    "PlanRequest",
    "PlanRules",
    "Policy",
    "PrivacyLedger",
    "RecordDPSetup",
    "Refusal",
    "check",
    "check_local_setup",
    "epsilon_of",
    "load_policy",
    "noisy_label_histogram",
    "parse_policy",
]
