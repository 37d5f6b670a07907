"""Secure aggregation on the coordinator: drives one round of :class:`SecAggServer` over the
workers' streams, with a timeout on every phase.

The round's collector replaces plain aggregation without touching the strategy: it sums the
masked inputs, unmasks the total, and feeds the strategy's aggregator *one* update, the
example-weighted mean (global weights + mean delta) with the summed example count. Any
strategy that only needs the weighted mean works unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedcore.errors import ProtocolError, SecAggError
from fedcore.sanitize import printable
from fedcore.secagg import wire
from fedcore.secagg.params import SecAggParams
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.server import SecAggServer, ServerState
from fedcore.secagg.simulation import make_setup
from fedcore.secagg.wire import MASKED_TENSOR
from fedcore.strategy import FitResult, UpdateAggregator
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, TensorSignature, Weights, signature_of

from ..state.registry import SessionState, Ticket, WorkerSession
from .collectors import FitCollector
from .secagg_checks import bounded_count, bounded_mean

__all__ = ["MASKED_TENSOR", "SecAggCollector"]

log = logging.getLogger("fedcore.server")


class SecAggCollector(FitCollector):
    """One secure training round: the four phases, then one aggregated update.

    Args:
        round_number: the training round.
        aggregator: the strategy's aggregator for this round.
        global_weights: the weights the workers were sent.
        params: the secure-aggregation settings.
        sessions: the selected workers, in index order (index = position + 1).
        needed: masked inputs the round needs besides the threshold (``--min-results``).
        weight_norm: the example count that weighs 1 (default: the selected workers' total);
            1 under differential privacy, where every worker sends weight 1.
    """

    def __init__(
        self,
        round_number: int,
        aggregator: UpdateAggregator,
        global_weights: Weights,
        params: SecAggParams,
        sessions: Sequence[WorkerSession],
        needed: int,
        *,
        weight_norm: float | None = None,
    ) -> None:
        super().__init__(round_number, aggregator, global_weights)
        n = len(sessions)
        self.params = params
        self.needed = needed
        self.sessions = {i + 1: s for i, s in enumerate(sessions)}
        self._index = {s.worker_id: i for i, s in self.sessions.items()}
        self._signature: ModelSignature = signature_of(global_weights)
        self._words = sum(t.num_elements for t in self._signature)
        if weight_norm is None:
            weight_norm = max(1, sum(s.num_examples for s in sessions))
        self.setup = make_setup(
            params,
            n,
            weight_norm,
            members=[s.name for s in sessions] if params.signed else (),
            job=params.job,
            round_number=round_number,
        )
        self.server = SecAggServer(
            self.setup, n, self._words + COUNT_WORDS, degree=params.degree(n)
        )
        fp = self.setup.fixed_point
        self._masked_signature: ModelSignature = (
            TensorSignature(MASKED_TENSOR, fp.dtype.name, (self._words + COUNT_WORDS,)),
        )
        self._metrics: dict[int, dict[str, float]] = {}
        self._gave_up: set[int] = set()
        self._changed = asyncio.Event()
        self.phase_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ wire in

    @property
    def update_signature(self) -> ModelSignature | None:
        return self._masked_signature

    def setup_proto(self) -> pb.SecAggSetup:
        return wire.setup_to_proto(self.setup)

    def add(self, ticket: Ticket) -> None:
        """Track a ticket, and wake the phase loop when it resolves (result, error,
        disconnect)."""
        super().add(ticket)
        ticket.future.add_done_callback(lambda _: self._changed.set())

    def check_result(self, result: pb.TaskResult) -> None:
        if result.update_kind != pb.UPDATE_KIND_MASKED:
            raise ProtocolError("this round is securely aggregated: send a masked update")
        if result.num_examples != 0:
            raise ProtocolError("a masked update must not reveal its example count")

    def on_message(self, session: WorkerSession, message: pb.SecAggWorkerMessage) -> None:
        """Route one secure-aggregation message of this round's participants."""
        kind = message.WhichOneof("body")
        if kind is None:
            raise ProtocolError("an empty secure-aggregation message")
        body = getattr(message, kind)
        index = self._index.get(session.worker_id)
        if body.round_id != self.setup.round_id or index is None:
            log.debug("ignoring a %s message of another round from %r", kind, session.name)
            return
        state = self.server.state
        try:
            if kind == "keys" and state is ServerState.KEYS:
                self.server.add_keys(index, wire.keys_from_proto(body))
            elif kind == "shares" and state is ServerState.SHARES:
                self.server.add_shares(index, wire.shares_from_proto(body))
            elif kind == "consistency" and state is ServerState.CONSISTENCY:
                self.server.add_consistency(index, wire.consistency_from_proto(body))
            elif kind == "unmask" and state is ServerState.UNMASKING:
                self.server.add_unmask(index, wire.response_from_proto(body))
            elif kind == "abort":
                log.warning(
                    "round %d: worker %r left secure aggregation: %s",
                    self.round_number,
                    session.name,
                    printable(body.reason),
                )
                self._gave_up.add(index)
            else:
                log.info("round %d: late %s message from %r", self.round_number, kind, session.name)
        except SecAggError as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None
        self._changed.set()

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Fold a masked input into the running sum (phase 3)."""
        if update is None:
            raise ProtocolError("a masked input must carry an update")
        async with self.lock:
            index = self._index[ticket.session.worker_id]
            if self.server.state is not ServerState.INPUTS or ticket.future.done():
                self.fail(ticket, "masked input arrived outside of phase 3")
                return
            try:
                vector: Any = update[MASKED_TENSOR]  # dtype checked against the signature
                await asyncio.to_thread(self.server.add_masked, index, vector)
            except SecAggError as exc:
                self.fail(ticket, str(exc))
                raise ProtocolError(f"secure aggregation: {exc}") from None
            self._metrics[index] = dict(result.metrics)
            ticket.resolve(True)
            self._changed.set()

    # ------------------------------------------------------------------ phases

    def _live(self, index: int) -> bool:
        session = self.sessions[index]
        ticket = next((t for t in self.tickets if t.session is session), None)
        failed = ticket is not None and ticket.future.done() and ticket.future.result() is not True
        return (
            session.state is not SessionState.CLOSED and not failed and index not in self._gave_up
        )

    async def _until(
        self, done: Callable[[int], bool], members: Sequence[int], deadline: float
    ) -> None:
        """Wait until every live member is ``done``, or the deadline."""
        loop = asyncio.get_running_loop()
        while not all(done(i) or not self._live(i) for i in members):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def _send(self, index: int, message: pb.SecAggCoordinatorMessage) -> None:
        # Overtakes the weights' chunks: phases 1 and 2 overlap the download.
        self.sessions[index].send_urgent(pb.CoordinatorMessage(secagg=message))

    def _abort_members(self, members: Sequence[int], reason: str) -> None:
        abort = pb.SecAggCoordinatorMessage(
            abort=pb.SecAggAbort(round_id=self.setup.round_id, reason=reason)
        )
        for i in members:
            self._send(i, abort)

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        round_deadline = loop.time() + timeout
        phase = self.setup.phase_timeout
        everyone = sorted(self.sessions)
        try:
            await self._run(loop, round_deadline, phase, everyone)
        except SecAggError as exc:
            log.warning("round %d: %s", self.round_number, exc)
            self.results.clear()
            self._abort_members(everyone, str(exc))
        finally:
            self.settle(timeout)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        round_deadline: float,
        phase: float,
        everyone: list[int],
    ) -> None:
        rid = self.setup.round_id
        server = self.server
        started = time.perf_counter()
        # Phase 1: keys.
        await self._until(lambda i: i in server.keys, everyone, loop.time() + phase)
        directories = server.close_keys()
        for i, directory in directories.items():
            self._send(
                i, pb.SecAggCoordinatorMessage(peers=wire.directory_to_proto(rid, directory))
            )
        self._abort_members([i for i in everyone if i not in directories], "no keys in time")
        self.phase_seconds["keys"] = time.perf_counter() - started
        # Phase 2: shares.
        u1 = sorted(directories)
        sent: set[int] = set()
        await self._until(server.has_shares, u1, loop.time() + phase)
        inboxes = server.close_shares()
        for i, shares in inboxes.items():
            self._send(i, pb.SecAggCoordinatorMessage(shares=wire.shares_to_proto(rid, shares)))
            sent.add(i)
        self._abort_members([i for i in u1 if i not in sent], "no shares in time")
        self.phase_seconds["shares"] = time.perf_counter() - started - self.phase_seconds["keys"]
        # Phase 3: masked inputs (the workers train meanwhile: bounded by the round timeout).
        t3 = time.perf_counter()
        u2 = sorted(inboxes)
        await self._until(lambda i: i in server.u3, u2, round_deadline)
        async with self.lock:
            if len(server.u3) < self.needed:
                server.abort(
                    f"{len(server.u3)} masked input(s) arrived, {self.needed} needed "
                    "(--min-results)"
                )
            request = server.close_inputs()
        self.phase_seconds["inputs"] = time.perf_counter() - t3
        # Phase 4: unmasking.
        t4 = time.perf_counter()
        unmask = pb.SecAggCoordinatorMessage(unmask=wire.request_to_proto(rid, request))
        u3 = server.recipients_of_request()
        for i in u3:
            self._send(i, unmask)
        if self.setup.signed:
            # Phase 4a: the survivors' signatures on the request, relayed to all of them.
            await self._until(server.has_consistency, u3, loop.time() + phase)
            signatures = pb.SecAggCoordinatorMessage(
                signatures=wire.signatures_to_proto(rid, server.close_consistency())
            )
            for i in server.recipients_of_shares_request():
                self._send(i, signatures)
        u4 = server.recipients_of_shares_request()
        await self._until(server.has_unmask, u4, loop.time() + phase)
        result = await asyncio.to_thread(server.finish)
        for i, why in sorted(server.suspects.items()):
            log.warning(
                "round %d: worker %r sent %s; the round used the other workers' shares",
                self.round_number,
                self.sessions[i].name,
                why,
            )
        # A lying count (zero, or beyond what the contributors announced) must neither crash
        # the round nor skew it: see secagg_checks.
        count = bounded_count(
            self.round_number,
            result.num_examples,
            (self.sessions[i].num_examples for i in result.contributors),
            result.weight_norm,
        )
        fp = self.setup.fixed_point
        mean = bounded_mean(
            self.round_number,
            result.weighted_sum,
            result.weight_norm,
            count,
            clip=fp.clip,
            step=1.0 / fp.scale,
        )
        # One update for the strategy: the weighted mean, as full weights.
        update: Weights = {}
        offset = 0
        for spec in self._signature:
            g = self.global_weights[spec.name]
            part = mean[offset : offset + spec.num_elements].reshape(spec.shape)
            offset += spec.num_elements
            update[spec.name] = (g.astype(np.float64) + part).astype(g.dtype)
        await asyncio.to_thread(self.aggregator.add, update, count)
        for i in sorted(result.contributors):
            info = self.sessions[i].info
            self.results.append(FitResult(info, info.num_examples, self._metrics.get(i, {})))
        self.phase_seconds["unmask"] = time.perf_counter() - t4
        dropped = len(self.sessions) - len(result.contributors)
        log.info(
            "round %d: securely aggregated %d masked input(s) (%d worker(s) dropped, t=%d); "
            "phases %s",
            self.round_number,
            len(result.contributors),
            dropped,
            server.threshold,
            ", ".join(f"{k} {v:.3f} s" for k, v in self.phase_seconds.items()),
        )
