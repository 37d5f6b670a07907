"""The coordinator's one driver of a secure round: the phases of :class:`SecAggServer` over
any transport. Training rounds (``server.engine.secagg``) and analytics queries
(``server.analytics.rounds``) both run it; they differ only in how they reach a worker and
how long they wait, which they say through a :class:`RoundTransport`::

    keys ──▶ peers ──▶ shares ──▶ shares relayed ──▶ masked inputs ──▶ unmasking request
         ──▶ (signed mode: consistency signatures, relayed) ──▶ unmasking shares ──▶ the sum

Every phase waits for its live members, then closes: members that missed it are told to
abort, and the round goes on while the threshold allows (the server's state machine refuses
the rest). A transport that needs every member (analytics) raises from ``until`` instead.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedcore.errors import ProtocolError, SecAggError
from fedcore.sanitize import printable
from fedcore.v1 import fedcore_pb2 as pb

from . import wire
from .server import AggregateResult, SecAggServer, ServerState

__all__ = ["Phase", "RoundDriver", "RoundTransport"]

log = logging.getLogger("fedcore.server")


class Phase(enum.Enum):
    """What a :meth:`RoundTransport.until` is waiting for."""

    KEYS = "keys"
    SHARES = "key shares"
    INPUTS = "masked input"
    CONSISTENCY = "consistency signatures"
    UNMASK = "unmasking shares"


class RoundTransport(Protocol):
    """How one kind of round reaches its workers (indexes 1..n) and waits for them."""

    def send(self, index: int, message: pb.SecAggCoordinatorMessage) -> None:
        """Queue ``message`` for worker ``index`` (ahead of bulk data)."""

    async def until(
        self, phase: Phase, done: Callable[[int], bool], members: Sequence[int]
    ) -> None:
        """Return once every live member is ``done``, or at the phase's deadline; raise to
        end the round (for a transport that needs every member)."""


class RoundDriver:
    """Drives one round of ``server`` over ``transport``.

    Args:
        server: the round's state machine (its setup names the round).
        transport: how to reach and wait for the workers.
        label: names the round in logs ("round 3", "query 1f2e...").
        names: the workers' names, in index order (for logs).
        needed: the fewest masked inputs the round accepts besides the threshold, and
            ``why`` that many (e.g. "--min-results").
    """

    def __init__(
        self,
        server: SecAggServer,
        transport: RoundTransport,
        *,
        label: str,
        names: Sequence[str],
        needed: int = 0,
        why: str = "",
    ) -> None:
        self.server = server
        self.setup = server.setup
        self.transport = transport
        self.label = label
        self.names = tuple(names)
        self.needed = needed
        self.why = why
        #: Held while a masked input is folded in, and while phase 3 closes.
        self.inputs_lock = asyncio.Lock()
        self.phase_seconds: dict[str, float] = {}

    def _name(self, index: int) -> str:
        return self.names[index - 1] if 1 <= index <= len(self.names) else str(index)

    # ------------------------------------------------------------------ wire in

    def receive(self, index: int, message: pb.SecAggWorkerMessage) -> str | None:
        """Route one message of worker ``index``; returns the reason if it left the round.

        Messages of another round, and late ones, are ignored.

        Raises:
            ProtocolError: the message breaks the protocol (the worker is at fault).
        """
        kind = message.WhichOneof("body")
        if kind is None:
            raise ProtocolError("an empty secure-aggregation message")
        body = getattr(message, kind)
        if body.round_id != self.setup.round_id:
            log.debug("%s: ignoring a %s message of another round", self.label, kind)
            return None
        server = self.server
        state = server.state
        try:
            if kind == "keys" and state is ServerState.KEYS:
                server.add_keys(index, wire.keys_from_proto(body))
            elif kind == "shares" and state is ServerState.SHARES:
                server.add_shares(index, wire.shares_from_proto(body))
            elif kind == "consistency" and state is ServerState.CONSISTENCY:
                server.add_consistency(index, wire.consistency_from_proto(body))
            elif kind == "unmask" and state is ServerState.UNMASKING:
                server.add_unmask(index, wire.response_from_proto(body))
            elif kind == "abort":
                reason = printable(body.reason)[:2000]
                log.warning(
                    "%s: worker %r left secure aggregation: %s",
                    self.label,
                    self._name(index),
                    reason,
                )
                return reason or "no reason given"
            else:
                log.info("%s: late %s message from %r", self.label, kind, self._name(index))
        except SecAggError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None
        return None

    @property
    def accepting_inputs(self) -> bool:
        """Whether phase 3 is open."""
        return self.server.state is ServerState.INPUTS

    def add_masked(self, index: int, vector: npt.NDArray[np.unsignedinteger]) -> None:
        """Phase 3: fold worker ``index``'s masked input into the sum (hold
        :attr:`inputs_lock` when calling it off the event loop).

        Raises:
            SecAggError: outside phase 3, a second input, or a malformed vector.
        """
        if not self.accepting_inputs:
            raise SecAggError("masked input arrived outside of phase 3")
        self.server.add_masked(index, vector)

    # ------------------------------------------------------------------ phases

    def abort(self, members: Sequence[int], reason: str) -> None:
        """Tell ``members`` the round is over for them."""
        message = pb.SecAggCoordinatorMessage(
            abort=pb.SecAggAbort(round_id=self.setup.round_id, reason=reason[:500])
        )
        for i in members:
            self.transport.send(i, message)

    async def run(self, members: Sequence[int]) -> AggregateResult:
        """The four phases over ``members``; returns the unmasked sum.

        Raises:
            SecAggError: too few workers at some phase (nobody is told: see :meth:`abort`),
                or whatever the transport's ``until`` raises.
        """
        server = self.server
        transport = self.transport
        rid = self.setup.round_id
        everyone = sorted(members)
        started = time.perf_counter()
        # Phase 1: keys.
        await transport.until(Phase.KEYS, lambda i: i in server.keys, everyone)
        directories = server.close_keys()
        for i, directory in directories.items():
            transport.send(
                i, pb.SecAggCoordinatorMessage(peers=wire.directory_to_proto(rid, directory))
            )
        self.abort([i for i in everyone if i not in directories], "no keys in time")
        self.phase_seconds["keys"] = time.perf_counter() - started
        # Phase 2: shares.
        t = time.perf_counter()
        u1 = sorted(directories)
        await transport.until(Phase.SHARES, server.has_shares, u1)
        inboxes = server.close_shares()
        for i, shares in inboxes.items():
            transport.send(i, pb.SecAggCoordinatorMessage(shares=wire.shares_to_proto(rid, shares)))
        self.abort([i for i in u1 if i not in inboxes], "no shares in time")
        self.phase_seconds["shares"] = time.perf_counter() - t
        # Phase 3: masked inputs (training runs meanwhile).
        t = time.perf_counter()
        await transport.until(Phase.INPUTS, lambda i: i in server.u3, sorted(inboxes))
        async with self.inputs_lock:
            if len(server.u3) < self.needed:
                server.abort(
                    f"{len(server.u3)} masked input(s) arrived, {self.needed} needed ({self.why})"
                )
            request = server.close_inputs()
        self.phase_seconds["inputs"] = time.perf_counter() - t
        # Phase 4: unmasking.
        t = time.perf_counter()
        unmask = pb.SecAggCoordinatorMessage(unmask=wire.request_to_proto(rid, request))
        u3 = server.recipients_of_request()
        for i in u3:
            transport.send(i, unmask)
        if self.setup.signed:
            # Phase 4a: the survivors' signatures on the request, relayed to all of them.
            await transport.until(Phase.CONSISTENCY, server.has_consistency, u3)
            signatures = pb.SecAggCoordinatorMessage(
                signatures=wire.signatures_to_proto(rid, server.close_consistency())
            )
            for i in server.recipients_of_shares_request():
                transport.send(i, signatures)
        await transport.until(
            Phase.UNMASK, server.has_unmask, server.recipients_of_shares_request()
        )
        result = await asyncio.to_thread(server.finish)
        self.phase_seconds["unmask"] = time.perf_counter() - t
        for i, why in sorted(server.suspects.items()):
            log.warning(
                "%s: worker %r sent %s; the round used the other workers' shares",
                self.label,
                self._name(i),
                why,
            )
        return result
