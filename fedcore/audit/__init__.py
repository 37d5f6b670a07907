"""Empirical privacy auditing: does the code leak more than the epsilon it reports?

``fed-audit`` runs each mechanism as deployed many times on neighbouring inputs, with and
without a canary, and turns the best distinguishing test into a lower bound on epsilon with
Clopper-Pearson confidence (Jagielski et al. 2020; Nasr et al. 2021). See docs/audit.md.

==============  ===============================================================
``stats``       Clopper-Pearson intervals, epsilon lower bounds from test rates
``mechanism``   the adapter protocol (:class:`AuditedMechanism`), broken noise
``fedavg``      a DP-FedAvg round with a canary worker
``analytics``   an analytics query with and without one row
``dpsgd``       a DP-SGD silo with a canary record (Opacus)
``runner``      many runs on both sides, and the verdict
``suite``       the audited mechanisms, positive controls and run counts
``cli``         ``fed-audit``
==============  ===============================================================
"""

from __future__ import annotations

from .mechanism import AuditedMechanism, Claim, ScaledNoise
from .runner import AuditResult, Expect, audit
from .stats import clopper_pearson, epsilon_from_rates, epsilon_lower_bound

__all__ = [
    "AuditResult",
    "AuditedMechanism",
    "Claim",
    "Expect",
    "ScaledNoise",
    "audit",
    "clopper_pearson",
    "epsilon_from_rates",
    "epsilon_lower_bound",
]
