"""Secure aggregation on the coordinator: drives one round of :class:`SecAggServer` over the
workers' streams, with a timeout on every phase.

The round's collector replaces plain aggregation without touching the strategy: it sums the
masked inputs, unmasks the total, and feeds the strategy's aggregator *one* update, the
example-weighted mean (global weights + mean delta) with the summed example count. Any
strategy that only needs the weighted mean works unchanged.

Each worker's model, after its first chunk, waits on the stream for that worker's key
directory (the gate ``RoundContext.issue`` queues, opened by ``SecAggCollector.send`` or when
the round ends): model bytes already in the link would hold the directory back, and with it
phases 2 and 3.

Masked inputs stream: each arriving chunk is added to the ring sum at once
(:mod:`fedcore.secagg.ring`), so the round's uploads proceed in parallel, take no upload slot,
and the coordinator holds one ring vector; an input cut off part-way is subtracted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedcore.errors import ProtocolError, SecAggError
from fedcore.secagg import wire
from fedcore.secagg.driver import Phase, RoundDriver
from fedcore.secagg.params import SecAggParams
from fedcore.secagg.quantize import COUNT_WORDS
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.setup import make_setup
from fedcore.secagg.wire import MASKED_TENSOR
from fedcore.strategy import FitResult, UpdateAggregator
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, TensorSignature, Weights, signature_of

from ..state.registry import PayloadGate, SessionState, Ticket, UploadSink, WorkerSession
from ..transport.upload_stream import StreamedUpload
from .collectors import FitCollector
from .secagg_checks import bounded_count, bounded_update

__all__ = ["MASKED_TENSOR", "SecAggCollector"]

log = logging.getLogger("fedcore.server")


class SecAggCollector(FitCollector):
    """One secure training round: the four phases (:class:`RoundDriver`), then one
    aggregated update.

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
        job_id: str = "",
    ) -> None:
        """``job_id``: the job whose round this is (empty: a one-shot federation's); every
        message of the round carries it, and only its messages are routed here."""
        super().__init__(round_number, aggregator, global_weights)
        self.job_id = job_id
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
        self.driver = RoundDriver(
            self.server,
            self,
            label=f"round {round_number}",
            names=[s.name for s in sessions],
            needed=needed,
            why="--min-results",
        )
        fp = self.setup.fixed_point
        self._masked_signature: ModelSignature = (
            TensorSignature(MASKED_TENSOR, fp.dtype.name, (self._words + COUNT_WORDS,)),
        )
        self._metrics: dict[int, dict[str, float]] = {}
        self._gave_up: set[int] = set()
        self._changed = asyncio.Event()
        self._round_deadline = 0.0
        # Each worker's model waits here for its key directory (see RoundContext.issue).
        self._gates: dict[int, PayloadGate] = {}

    @property
    def phase_seconds(self) -> dict[str, float]:
        return self.driver.phase_seconds

    # ------------------------------------------------------------------ wire in

    @property
    def update_signature(self) -> ModelSignature | None:
        return self._masked_signature

    def setup_proto(self) -> pb.SecAggSetup:
        return wire.setup_to_proto(self.setup)

    def add(self, ticket: Ticket) -> None:
        """Track a ticket, and wake the phase loop when it resolves (result, error,
        disconnect); its payload's gate opens with the first message of the round that
        worker gets after its keys (the key directory, or an abort)."""
        super().add(ticket)
        ticket.future.add_done_callback(lambda _: self._changed.set())
        index = self._index.get(ticket.session.worker_id)
        if ticket.gate is not None and index is not None:
            self._gates[index] = ticket.gate

    def check_result(self, result: pb.TaskResult) -> None:
        if result.update_kind != pb.UPDATE_KIND_MASKED:
            raise ProtocolError("this round is securely aggregated: send a masked update")
        if result.num_examples != 0:
            raise ProtocolError("a masked update must not reveal its example count")

    def on_message(self, session: WorkerSession, message: pb.SecAggWorkerMessage) -> None:
        """Route one secure-aggregation message of this round's participants."""
        index = self._index.get(session.worker_id)
        if index is None:
            log.debug("ignoring a secure-aggregation message from %r", session.name)
            return
        if self.driver.receive(index, message) is not None:
            self._gave_up.add(index)
        self._changed.set()

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Fold a masked input into the running sum (phase 3)."""
        if update is None:
            raise ProtocolError("a masked input must carry an update")
        async with self.lock, self.driver.inputs_lock:
            index = self._index[ticket.session.worker_id]
            if not self.driver.accepting_inputs or ticket.future.done():
                self.fail(ticket, "masked input arrived outside of phase 3")
                return
            try:
                vector: Any = update[MASKED_TENSOR]  # dtype checked against the signature
                await asyncio.to_thread(self.driver.add_masked, index, vector)
            except SecAggError as exc:
                self.fail(ticket, str(exc))
                raise ProtocolError(f"secure aggregation: {exc}") from None
            self._metrics[index] = dict(result.metrics)
            ticket.resolve(True)
            self._changed.set()

    def open_stream(
        self, ticket: Ticket, result: pb.TaskResult, signature: ModelSignature
    ) -> UploadSink | None:
        """Add the masked input to the ring sum chunk by chunk (None outside phase 3 or for
        a second input: staged whole, :meth:`accept` refuses it with the reason)."""
        index = self._index.get(ticket.session.worker_id)
        if index is None or ticket.future.done() or not self.driver.accepting_inputs:
            return None
        try:
            stream = self.server.open_masked(index)
        except SecAggError:
            return None
        return StreamedUpload(
            signature,
            total_bytes=result.update.total_bytes,
            chunk_bytes=result.update.chunk_bytes,
            stream=stream,
            base=None,
            what=f"masked input from worker {ticket.session.name!r}",
        )

    async def finish_stream(self, ticket: Ticket, result: pb.TaskResult, sink: UploadSink) -> None:
        """Count a complete masked input (its sender joins U3), unless phase 3 closed first
        (then it was taken back out of the sum)."""
        assert isinstance(sink, StreamedUpload)
        async with self.lock, self.driver.inputs_lock:
            if ticket.future.done() or not sink.stream.commit():
                sink.abort()
                self.fail(ticket, "masked input arrived outside of phase 3")
                return
            index = self._index[ticket.session.worker_id]
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

    # ------------------------------------------------------------------ RoundTransport

    def send(self, index: int, message: pb.SecAggCoordinatorMessage) -> None:
        # Overtakes the weights' chunks: phases 1 and 2 overlap the download. The directory
        # (or an abort) is the first message after the keys: the model, held until now,
        # follows it on the stream.
        message.job_id = self.job_id
        self.sessions[index].send_urgent(pb.CoordinatorMessage(secagg=message))
        self._open(index)

    def _open(self, index: int) -> None:
        gate = self._gates.pop(index, None)
        if gate is not None:
            gate.open()

    async def until(
        self, phase: Phase, done: Callable[[int], bool], members: Sequence[int]
    ) -> None:
        """Up to the phase timeout; the masked inputs (the workers train meanwhile) up to
        the round's deadline. Late or departed workers drop out of the round."""
        if phase is Phase.INPUTS:
            deadline = self._round_deadline
        else:
            deadline = asyncio.get_running_loop().time() + self.setup.phase_timeout
        await self._until(done, members, deadline)

    # ------------------------------------------------------------------ the round

    async def wait(self, timeout: float) -> None:
        self._round_deadline = asyncio.get_running_loop().time() + timeout
        everyone = sorted(self.sessions)
        try:
            await self._run(everyone)
        except SecAggError as exc:
            log.warning("round %d: %s", self.round_number, exc)
            self.results.clear()
            self.driver.abort(everyone, str(exc))
        finally:
            # However the round ended (even cancelled), settle resolves every ticket, and a
            # resolved ticket opens its gate (RoundContext.issue): no model stays held.
            self.settle(timeout)

    async def _run(self, everyone: list[int]) -> None:
        result = await self.driver.run(everyone)
        started = time.perf_counter()
        # A lying count (zero, or beyond what the contributors announced) must neither crash
        # the round nor skew it: see secagg_checks.
        count = bounded_count(
            self.round_number,
            result.num_examples,
            (self.sessions[i].num_examples for i in result.contributors),
            result.weight_norm,
        )
        fp = self.setup.fixed_point
        # One update for the strategy: the weighted mean, as full weights (off the loop).
        update = await asyncio.to_thread(
            bounded_update,
            self.round_number,
            result.words,
            fp,
            result.weight_norm,
            count,
            self.global_weights,
            self._signature,
        )
        await asyncio.to_thread(self.aggregator.add, update, count)
        for i in sorted(result.contributors):
            info = self.sessions[i].info
            self.results.append(FitResult(info, info.num_examples, self._metrics.get(i, {})))
        self.phase_seconds["unmask"] += time.perf_counter() - started
        dropped = len(self.sessions) - len(result.contributors)
        log.info(
            "round %d: securely aggregated %d masked input(s) (%d worker(s) dropped, t=%d); "
            "phases %s",
            self.round_number,
            len(result.contributors),
            dropped,
            self.server.threshold,
            ", ".join(f"{k} {v:.3f} s" for k, v in self.phase_seconds.items()),
            extra={
                "event": "secagg_aggregated",
                "round": self.round_number,
                "inputs": len(result.contributors),
                "dropped": dropped,
                "threshold": self.server.threshold,
            },
        )
