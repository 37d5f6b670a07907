"""Whether a job's model may leave the network: every silo's ``[release] model`` policy.

A silo's owner states in its policy whether models trained on its data may be released to the
data scientist: ``"allowed"``, ``"dp-only"`` (only from a job with client-level differential
privacy) or ``"never"``. The worker announces it in its hello; a job records the policy of
every silo it could select, and ``fed-job pull`` hands out the model only when all allow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RELEASE_POLICIES", "release_refusal", "release_terms"]

RELEASE_POLICIES = ("allowed", "dp-only", "never")


def release_terms(policies: Mapping[str, str], *, private: bool) -> dict[str, Any]:
    """What a pull is judged by: each silo's policy and whether the job was private."""
    return {"silos": dict(sorted(policies.items())), "private": private}


def release_refusal(terms: Mapping[str, Any]) -> str | None:
    """None when the model may be released under ``terms``; else why not (which silos)."""
    silos: dict[str, str] = dict(terms.get("silos", {}))
    private = bool(terms.get("private", False))
    blocking = sorted(
        name
        for name, policy in silos.items()
        if policy not in RELEASE_POLICIES  # an unknown word from the network: the strictest
        or policy == "never"
        or (policy == "dp-only" and not private)
    )
    if not blocking:
        return None
    return (
        "the release policy of silo(s) "
        + ", ".join(f"{name} ({silos[name]})" for name in blocking)
        + (
            " forbids releasing this model"
            if private
            else " forbids releasing a model trained without differential privacy"
        )
    )
