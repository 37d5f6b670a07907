"""A job waiting for data owners: plans, or jobs, their owners have not decided on yet.

Owners decide on shipped plans (``[plans] require-approval``), or on every job
(``[jobs] approval = "always"``); both answer alike, with their own rule.

A worker whose owner requires approval answers a task it may not run yet with "awaiting
approval" (``ERROR_CODE_AWAITING_APPROVAL``) and queues the request (``fed-worker
requests``). The round engine keeps the results already in and asks that worker again,
backing off, until its owner decides or ``--approval-timeout`` passes (``SyncEngine``); the
silos that already trained are not asked again, so no privacy is spent twice. While it waits,
:meth:`ApprovalWatch.awaiting` shows the job as ``awaiting-approval`` ("awaiting approval at 2
of 3 silos"). A round that still fails on approval refusals ends the job: a denial with the
owner's reason, a silo still undecided with the timeout. Any other failure is the engine's,
as in a one-shot federation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fedcore.errors import RoundFailedError

__all__ = ["ApprovalWatch", "Verdict"]

Verdict = Literal["denied", "failed"]

#: How the refusals of owners' decisions are tagged (``TaskRefused``'s ``[rule]:``).
_RULES = ("[plans.approval]:", "[jobs.approval]:")


def _decision(reason: str) -> str | None:
    """The owner's words in a refusal over a decision (None: another refusal)."""
    for rule in _RULES:
        if rule in reason:
            return reason.split(rule, 1)[1].strip()
    return None


class ApprovalWatch:
    """What a job shows while owners decide, and what it does with a round they stopped."""

    def __init__(self, timeout: float, note: Callable[[str, str], None]) -> None:
        self._timeout = timeout
        self._note = note
        self._noted = ""
        #: Why the job was denied ("" while it was not).
        self.denied = ""

    def awaiting(self, names: list[str], issued: int) -> None:
        """The engine's report of whom the round waits on (``[]``: nobody any more)."""
        if not names:
            if self._noted:
                self._note("approved: running", "running")
                self._noted = ""
            return
        text = (
            f"awaiting approval at {len(names)} of {max(issued, len(names))} silos ("
            + ", ".join(sorted(names))
            + "): their owners decide with `fed-worker requests approve|deny`"
        )
        if text != self._noted:  # one log line per change
            self._note(text, "awaiting-approval")
            self._noted = text

    def verdict(self, failure: RoundFailedError) -> Verdict:
        """``denied`` when the round failed only on owners' decisions (a denial, or no decision
        within the timeout: :attr:`denied` says which), else ``failed``."""
        answers = failure.answers
        approval = {n: d for n, r in answers.items() if (d := _decision(r)) is not None}
        if not approval or len(approval) != len(answers):
            return "failed"
        denials = {n: d for n, d in approval.items() if "denied by the data owner" in d}
        if denials:
            self.denied = "; ".join(f"denied at silo {n}: {d}" for n, d in denials.items())
        else:
            self.denied = (
                f"no decision within the approval timeout ({self._timeout:g} s) at silo(s) "
                + ", ".join(sorted(approval))
            )
        return "denied"
