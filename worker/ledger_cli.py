"""``fed-worker ledger --policy POLICY.toml``: what the silo's privacy ledger has spent.

The ledger (``[budget] ledger``) stores each release as the mechanism it ran (a Gaussian
noise multiplier, a sampling rate, a number of steps), which is what composes exactly; a data
owner reads epsilon. This prints, per charge, its epsilon alone and the study's running total
at the policy's delta (dp-accounting's RDP accountant, as the worker's own check), then the
budget and what is left. Reading takes the ledger's lock, so it is safe beside a running
worker; it never writes, and imports no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fedcore.cli_support import run_cli
from fedcore.errors import ConfigError
from fedcore.policy import PrivacyLedger, epsilon_of, load_policy

__all__ = ["build_ledger_parser", "ledger_lines", "ledger_main"]


def build_ledger_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-worker ledger",
        description="Show the privacy this silo spent on its policy's study, in epsilon.",
    )
    p.add_argument(
        "--policy", type=Path, required=True, help="the worker's policy (its [budget] section)"
    )
    return p


def ledger_lines(ledger: PrivacyLedger, *, budget: float, delta: float) -> list[str]:
    """The table ``fed-worker ledger`` prints: one row per charge, then the totals."""
    charges = ledger.charges()
    lines = [f"study {ledger.study!r} in {ledger.path}: {len(charges)} charge(s), at δ={delta:g}"]
    if charges:
        lines.append(f"  {'charge':<40} {'ε alone':>9} {'ε total':>9}")
    for i, charge in enumerate(charges):
        alone = epsilon_of([charge], delta=delta)
        total = epsilon_of(charges[: i + 1], delta=delta)
        what = (charge.what or "-")[:40]
        lines.append(f"  {what:<40} {alone:9.4g} {total:9.4g}")
    spent = epsilon_of(charges, delta=delta)
    lines.append(
        f"spent ε={spent:.4g} of the budget ε={budget:g}; left ε={max(budget - spent, 0.0):.4g}"
    )
    return lines


def _run(argv: Sequence[str]) -> None:
    args = build_ledger_parser().parse_args(argv)
    budget = load_policy(args.policy).budget
    if budget is None:
        raise ConfigError(f"the policy {args.policy} has no [budget] section, hence no ledger")
    ledger = PrivacyLedger(budget.ledger, study=budget.study)
    for line in ledger_lines(ledger, budget=budget.epsilon, delta=budget.delta):
        print(line)


def ledger_main(argv: Sequence[str]) -> int:
    """Entry point of ``fed-worker ledger ...``."""
    return run_cli("fed-worker ledger", lambda: _run(argv))
