"""The worker's one client of a secure round on the wire: a :class:`SecAggClient` answering
the coordinator's phase messages. Training (``worker.secagg``) and analytics
(``worker.analytics``) both run it; they differ only in what happens once this worker holds
its shares (training masks its update when training ends; a query masks its noisy sums at
once) and in what they do when the round ends::

    start: keys ──▶ peers: shares, on_directory ──▶ shares: on_shares ──▶ ... masked input ...
          ──▶ unmask: (signed mode: a consistency signature ──▶ signatures:) unmasking shares

Any failure, or a request an honest worker must refuse, abandons the round (telling the
coordinator why) and forgets its secrets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fedcore.errors import SecAggError
from fedcore.v1 import fedcore_pb2 as pb

from . import wire
from .client import ClientState, SecAggClient
from .messages import UnmaskResponse

__all__ = ["Participant", "SendSecAgg"]

log = logging.getLogger("fedcore.worker")

#: How a participant's messages reach the coordinator (in the caller's envelope).
SendSecAgg = Callable[[pb.SecAggWorkerMessage], Awaitable[None]]


async def _nothing() -> None:
    return None


class Participant:
    """Drives ``client`` through one round.

    Args:
        client: this worker's state machine for the round.
        send: sends one message to the coordinator.
        label: names the round in logs.
        on_directory: awaited once this worker sent its shares for the key directory (its
            seeds are drawn: a mask may be expanded ahead).
        on_shares: awaited once this worker holds its shares (phase 3 may start); a
            :class:`SecAggError` it raises abandons the round.
        on_end: called once when the round ends: True once the unmasking shares are sent,
            False when it was abandoned (by either side).
    """

    def __init__(
        self,
        client: SecAggClient,
        send: SendSecAgg,
        *,
        label: str,
        on_directory: Callable[[], Awaitable[None]] = _nothing,
        on_shares: Callable[[], Awaitable[None]] = _nothing,
        on_end: Callable[[bool], None] = lambda revealed: None,
    ) -> None:
        self.client = client
        self._send = send
        self.label = label
        self._on_directory = on_directory
        self._on_shares = on_shares
        self._on_end = on_end
        #: Set once this worker holds its shares, or the round was abandoned.
        self.settled = asyncio.Event()
        self.reason = ""
        self.ended = False

    @property
    def round_id(self) -> str:
        return self.client.setup.round_id

    async def start(self) -> bool:
        """Phase 1: send this worker's keys; False if it refuses the round (it told why)."""
        try:
            advertised = self.client.advertise()
        except SecAggError as exc:  # e.g. a round this worker's roster refuses
            await self.give_up(str(exc), tell=True)
            return False
        await self._send(pb.SecAggWorkerMessage(keys=wire.keys_to_proto(self.round_id, advertised)))
        return True

    def _end(self, revealed: bool) -> None:
        if not self.ended:
            self.ended = True
            self._on_end(revealed)

    async def give_up(self, reason: str, *, tell: bool) -> None:
        """Abandon the round, forgetting its secrets (and tell the coordinator)."""
        self.client.abort()
        self.reason = reason
        self.settled.set()
        if self.ended:
            return
        log.warning("%s: secure aggregation abandoned: %s", self.label, reason)
        if tell:
            abort = pb.SecAggAbort(round_id=self.round_id, reason=reason)
            await self._send(pb.SecAggWorkerMessage(abort=abort))
        self._end(False)

    async def handle(self, message: pb.SecAggCoordinatorMessage) -> None:
        """One message of the coordinator's side of the protocol (others' rounds ignored)."""
        kind = message.WhichOneof("body")
        if kind is None:
            return
        body = getattr(message, kind)
        client = self.client
        rid = self.round_id
        if body.round_id != rid or client.state is ClientState.ABORTED or self.ended:
            return
        try:
            if kind == "peers":
                shares = client.share_keys(wire.directory_from_proto(body))
                await self._send(pb.SecAggWorkerMessage(shares=wire.shares_to_proto(rid, shares)))
                log.info(
                    "%s: sent key shares to %d peer(s)",
                    self.label,
                    len(shares),
                    extra={"event": "secagg_phase", "phase": "key_shares", "peers": len(shares)},
                )
                await self._on_directory()
            elif kind == "shares":
                client.receive_shares(wire.shares_from_proto(body))
                self.settled.set()
                await self._on_shares()
            elif kind == "unmask" and client.signed:
                signature = client.consistency(wire.request_from_proto(body))
                consistency = wire.consistency_to_proto(rid, signature)
                await self._send(pb.SecAggWorkerMessage(consistency=consistency))
                log.info(
                    "%s: signed the unmasking request",
                    self.label,
                    extra={"event": "secagg_phase", "phase": "consistency"},
                )
            elif kind == "unmask":
                await self._reveal(client.unmask(wire.request_from_proto(body)))
            elif kind == "signatures":
                await self._reveal(client.unmask_checked(wire.signatures_from_proto(body)))
            elif kind == "abort":
                await self.give_up(f"the coordinator aborted: {body.reason}", tell=False)
        except SecAggError as exc:
            await self.give_up(str(exc), tell=True)

    async def _reveal(self, response: UnmaskResponse) -> None:
        unmask = wire.response_to_proto(self.round_id, response)
        await self._send(pb.SecAggWorkerMessage(unmask=unmask))
        log.info(
            "%s: sent unmasking shares",
            self.label,
            extra={"event": "secagg_phase", "phase": "unmask"},
        )
        self._end(True)
