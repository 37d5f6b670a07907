"""Collecting one round's results: tickets out, validated results folded in as they arrive.

Every collector implements :class:`~fedcore.server.state.registry.Collector`, the one
interface the inbox calls: ``check_result`` on the envelope, ``accept`` with the validated
result (and its update, for training), ``fail`` when a worker does not deliver.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

from fedcore.compression import compressed_signature, decompress
from fedcore.errors import ConfigError, PayloadError, ProtocolError
from fedcore.strategy import (
    EvaluateResult,
    Failure,
    FitResult,
    StreamingAggregator,
    UpdateAggregator,
)
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, signature_of

from ..state.registry import Ticket, UploadSink
from ..transport.upload_stream import StreamedUpload, layout_of

__all__ = ["EvaluateCollector", "FitCollector", "RoundCollector"]

log = logging.getLogger("fedcore.server")


@dataclass
class RoundCollector:
    """Tracks the tickets of one round until each is resolved or the deadline passes."""

    round_number: int
    tickets: list[Ticket] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    closed: bool = False
    # How many tasks the round handed out (tickets are released when it closes).
    issued: int = 0

    @property
    def update_signature(self) -> ModelSignature | None:
        """The signature updates must have; None: the model's own."""
        return None

    @property
    def reported(self) -> int:
        """Valid results received so far."""
        return 0

    def check_result(self, result: pb.TaskResult) -> None:
        """Refuse a result whose envelope breaks the protocol. Default: any is fine."""

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Take one validated result (called by the inbox)."""
        raise NotImplementedError

    def open_stream(
        self, ticket: Ticket, result: pb.TaskResult, signature: ModelSignature
    ) -> UploadSink | None:
        """Default: updates are staged whole."""
        return None

    async def finish_stream(self, ticket: Ticket, result: pb.TaskResult, sink: UploadSink) -> None:
        raise ProtocolError("this round takes no streamed updates")

    def add(self, ticket: Ticket) -> None:
        """Track a ticket issued for this round."""
        self.tickets.append(ticket)

    def fail(
        self,
        ticket: Ticket,
        reason: str,
        *,
        refused: bool = False,
        answered: bool = False,
        awaiting: bool = False,
    ) -> None:
        """Record that ``ticket``'s worker did not deliver (``refused``: its policy said no;
        ``answered``: the worker reported the failure itself; ``awaiting``: its data owner has
        not decided on the plan yet)."""
        if not ticket.future.done():
            failure = Failure(
                ticket.session.info, reason, refused=refused, answered=answered, awaiting=awaiting
            )
            self.failures.append(failure)
            ticket.resolve(None)

    def reopen(self, failures: list[Failure]) -> None:
        """Take ``failures`` (workers that answered "awaiting approval") back out of the
        closed round, so that tasks issued to them again count as theirs."""
        self.failures = [f for f in self.failures if f not in failures]
        self.issued -= len(failures)
        self.closed = False

    async def wait(self, timeout: float) -> None:
        """Wait for every ticket, at most ``timeout`` seconds; late ones become failures."""
        pending = [t.future for t in self.tickets if not t.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self.settle(timeout)

    def settle(self, timeout: float) -> None:
        """Close the round: tickets still pending become stale failures."""
        self.closed = True
        self.issued += len(self.tickets)
        for ticket in self.tickets:
            if not ticket.future.done():
                ticket.stale = True
                self.fail(ticket, f"no result within the round timeout of {timeout:g} s")
            else:
                outcome = ticket.future.result()
                if isinstance(outcome, BaseException):
                    self.failures.append(Failure(ticket.session.info, str(outcome)))
            # Break the ticket <-> collector cycle: a late result finds no collector and is
            # dropped, and the round's model-sized state is freed now, not at the next full
            # garbage collection.
            ticket.collector = None
        self.tickets.clear()


class FitCollector(RoundCollector):
    """Folds each valid update into the strategy's aggregator the moment it arrives."""

    def check_result(self, result: pb.TaskResult) -> None:
        """Refuse a training result whose envelope breaks the protocol."""
        if result.num_examples < 1:
            raise ProtocolError("a training result must report at least one example")
        if result.update_kind not in (pb.UPDATE_KIND_WEIGHTS, pb.UPDATE_KIND_DELTA):
            raise ProtocolError("a training result must say whether it sends weights or a delta")
        if self.compression != "none" and result.update_kind != pb.UPDATE_KIND_DELTA:
            raise ProtocolError(
                f"the federation runs with --compression {self.compression}, but this worker "
                "sent full-precision weights; run the coordinator's fedcore version on every "
                "worker"
            )

    def __init__(
        self,
        round_number: int,
        aggregator: UpdateAggregator,
        global_weights: Weights,
        *,
        compression: str = "none",
        weight_budget: float | None = None,
    ) -> None:
        super().__init__(round_number)
        self.aggregator = aggregator
        # Streaming aggregation: each chunk folded as it arrives, when the strategy streams
        # (it declared UpdateAccess.STREAM) and chunks are full-precision values.
        self._streaming: StreamingAggregator | None = None
        if weight_budget is not None and compression == "none":
            if not isinstance(aggregator, StreamingAggregator):
                raise ConfigError(
                    f"the strategy declares update_access STREAM but its aggregator "
                    f"{type(aggregator).__name__} is no StreamingAggregator"
                )
            aggregator.expect(weight_budget)
            self._streaming = aggregator
        self.global_weights = global_weights
        self.compression = compression
        # The global weights are what rounds train: without frozen parameters the whole model.
        self._update_signature = (
            compressed_signature(signature_of(global_weights), compression)
            if compression != "none"
            else signature_of(global_weights)
        )
        self.results: list[FitResult] = []
        self.lock = asyncio.Lock()

    @property
    def update_signature(self) -> ModelSignature | None:
        return self._update_signature

    @property
    def reported(self) -> int:
        return len(self.results)

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        """Aggregate one validated update (called by the inbox, inside an upload slot)."""
        if update is None:
            raise ProtocolError("a training result must carry an update")
        async with self.lock:
            if self.closed or ticket.stale or ticket.future.done():
                log.info("discarding a late update from %r", ticket.session.name)
                return
            if self.compression != "none":
                # The inbox checked the compressed signature; restore full-precision deltas.
                update = await asyncio.to_thread(
                    decompress, update, signature_of(self.global_weights), self.compression
                )
            if result.update_kind == pb.UPDATE_KIND_DELTA:
                for name, delta in update.items():
                    np.add(delta, self.global_weights[name], out=delta, casting="unsafe")
            # numpy releases the GIL: the event loop keeps serving streams meanwhile.
            try:
                await asyncio.to_thread(self.aggregator.add, update, int(result.num_examples))
            except PayloadError as exc:
                # Out of the exact sum's range: the aggregate is untouched, the worker failed.
                self.fail(ticket, str(exc))
                raise
            self.results.append(
                FitResult(ticket.session.info, int(result.num_examples), dict(result.metrics))
            )
            ticket.resolve(True)

    def open_stream(
        self, ticket: Ticket, result: pb.TaskResult, signature: ModelSignature
    ) -> UploadSink | None:
        """Fold this update chunk by chunk into the aggregate (None: stage it whole)."""
        if self._streaming is None:
            return None
        stream = self._streaming.open(layout_of(signature), int(result.num_examples))
        delta = result.update_kind == pb.UPDATE_KIND_DELTA
        return StreamedUpload(
            signature,
            total_bytes=result.update.total_bytes,
            chunk_bytes=result.update.chunk_bytes,
            stream=stream,
            base=self.global_weights if delta else None,
            what=f"update from worker {ticket.session.name!r}",
        )

    async def finish_stream(self, ticket: Ticket, result: pb.TaskResult, sink: UploadSink) -> None:
        """Count a fully folded update, unless its round closed first (then take it back)."""
        assert self._streaming is not None
        assert isinstance(sink, StreamedUpload)
        async with self.lock:
            late = self.closed or ticket.stale or ticket.future.done()
            if late or not self._streaming.commit(sink.stream, int(result.num_examples)):
                log.info("discarding a late update from %r", ticket.session.name)
                await asyncio.to_thread(sink.abort)
                return
            self.results.append(
                FitResult(ticket.session.info, int(result.num_examples), dict(result.metrics))
            )
            ticket.resolve(True)


class EvaluateCollector(RoundCollector):
    """Gathers federated evaluation metrics."""

    def __init__(self, round_number: int) -> None:
        super().__init__(round_number)
        self.results: list[EvaluateResult] = []

    @property
    def reported(self) -> int:
        return len(self.results)

    def check_result(self, result: pb.TaskResult) -> None:
        if result.HasField("update"):
            raise ProtocolError("an evaluation result must not carry an update")

    async def accept(self, ticket: Ticket, result: pb.TaskResult, update: Weights | None) -> None:
        if self.closed or ticket.stale or ticket.future.done():
            return
        self.results.append(
            EvaluateResult(ticket.session.info, int(result.num_examples), dict(result.metrics))
        )
        ticket.resolve(True)
