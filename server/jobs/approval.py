"""A job waiting for data owners: plans (and terms) their owners have not decided on yet.

A worker whose owner requires approval answers a task it may not run yet with a refusal of
rule ``plans.approval`` ("awaiting approval ...") and queues the request
(``fed-worker requests``). The decision lives on the worker's disk, so the job learns it by
sending the round again: :meth:`ApprovalWatch.wait` turns a round that failed only on such
refusals into the job state ``awaiting-approval`` ("awaiting approval at 2 of 3 silos"), waits
a poll interval (doubling up to 30 s) and asks the engine to retry; a denial ends the job with the owner's reason;
no decision within the approval timeout ends it too. A round failing for any other reason is
the engine's failure, as in a one-shot federation.

A retry sends the round to every selected silo again, so the silos that already admitted it
train it again (and a DP job charges their ledgers again): the poll backs off, and owners
should decide before a DP job is submitted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from fedcore.errors import RoundFailedError

from .workers import JobWorkers

__all__ = ["ApprovalWatch", "Verdict"]

Verdict = Literal["retry", "denied", "failed"]

_RULE = "[plans.approval]:"


class ApprovalWatch:
    """Decides what a job does with a failed round while owners decide."""

    def __init__(
        self, workers: JobWorkers, timeout: float, poll: float = 1.0, max_poll: float = 30.0
    ) -> None:
        self._workers = workers
        self._timeout = timeout
        self._poll = poll
        self._max_poll = max_poll
        self._since: float | None = None
        #: Why the job was denied ("" while it was not).
        self.denied = ""
        self._noted = ""

    async def wait(self, failure: RoundFailedError, note: Callable[[str, str], None]) -> Verdict:
        """``retry`` (owners still deciding; waited a poll interval), ``denied`` (a silo's
        owner denied it, or nobody decided in time: :attr:`denied` says which), or ``failed``
        (not an approval matter)."""
        answers = failure.answers
        approval = {n: r for n, r in answers.items() if _RULE in r}
        if not approval or len(approval) != len(answers):
            return "failed"
        denials = {n: r for n, r in approval.items() if "denied by the data owner" in r}
        if denials:
            self.denied = "; ".join(
                f"denied at silo {n}: {r.split(_RULE, 1)[1].strip()}" for n, r in denials.items()
            )
            return "denied"
        now = time.monotonic()
        self._since = self._since if self._since is not None else now
        if now - self._since > self._timeout:
            self.denied = (
                f"no decision within the approval timeout ({self._timeout:g} s) at silo(s) "
                + ", ".join(sorted(approval))
            )
            return "denied"
        total = max(len(self._workers.sessions()), len(approval))
        text = (
            f"awaiting approval at {len(approval)} of {total} silos ("
            + ", ".join(sorted(approval))
            + "): their owners decide with `fed-worker requests approve|deny`"
        )
        if text != self._noted:  # one log line per change, not one per poll
            note(text, "awaiting-approval")
            self._noted = text
        await asyncio.sleep(self._poll)  # the decision is on the workers' disks: ask again
        # Each retry runs the round again on the silos that admitted it: back off.
        self._poll = min(self._poll * 2, self._max_poll)
        return "retry"
