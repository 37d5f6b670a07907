"""What a worker sends, routed and checked: results, payload chunks, errors, heartbeats.

Anything that breaks the protocol raises :class:`~fedcore.errors.ProtocolError`; the stream
is then ended with a clear status and nothing the worker sent in that upload is aggregated.

When the round's strategy streams (``UpdateAccess.STREAM``), each chunk is checked and folded
into the aggregate the moment it arrives (:mod:`.upload_stream`): any number of uploads
proceed at once, no slot is taken, and an upload cut off or found bad part-way is taken back
out exactly; FedBuff's uploads likewise take no slot, each spooled to disk until it is
folded (:mod:`..engine.fedbuff`). Otherwise payloads are staged whole in an *upload slot* (a
semaphore): at most ``upload_slots`` updates are held in memory besides the running sum,
whatever the number of workers. A slot is lost by an upload that stalls or trickles (see
:meth:`Inbox.too_slow`), and given back the moment the upload's round ends (its ticket resolves): the rest of a late
upload is read and dropped (a late streamed upload likewise, once taken back out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcore.codec import ChunkLike, PayloadAssembler, num_chunks
from fedcore.errors import ModelMismatchError, PayloadError, ProtocolError
from fedcore.sanitize import printable
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature

from ..state.registry import Ticket, UploadSink, WorkerSession
from .untrusted import bound_claimed_examples, clean_metrics

__all__ = ["AnalyticsRoute", "Inbox", "SecAggRoute"]

#: Where secure-aggregation messages go: the current round's handler.
SecAggRoute = Callable[[WorkerSession, pb.SecAggWorkerMessage], None]
#: Where analytics messages go: the running query's round (server/analytics).
AnalyticsRoute = Callable[[WorkerSession, pb.AnalyticsWorkerMessage], None]

log = logging.getLogger("fedcore.server")


@dataclass
class _Upload:
    """An update being received: assembled, or skipped when its round already ended."""

    ticket: Ticket
    result: pb.TaskResult
    assembler: PayloadAssembler | None  # None (and no sink): discard the chunks
    remaining: int
    next_index: int = 0
    sink: UploadSink | None = None  # streamed: folded chunk by chunk, never staged


class Inbox:
    """Routes one session's incoming messages; one instance per stream."""

    def __init__(
        self,
        session: WorkerSession,
        *,
        signature: ModelSignature,
        max_model_bytes: int,
        chunk_limit: int,
        upload_slots: asyncio.Semaphore,
        secagg: SecAggRoute | None = None,
        analytics: AnalyticsRoute | None = None,
    ) -> None:
        self.session = session
        self._secagg = secagg
        self._analytics = analytics
        self._signature = signature
        self._max_model_bytes = max_model_bytes
        self._chunk_limit = chunk_limit
        self._slots = upload_slots
        self._upload: _Upload | None = None
        self._holding_slot = False
        # An upload the watchdog watches: one holding a slot, or a streamed one (which would
        # hold its round open instead of a slot).
        self._watched = False
        self._last_progress = 0.0
        self._slot_since = 0.0
        self._slot_bytes = 0
        # Take-backs of streamed uploads under way (kept so they are not collected early).
        self._aborts: set[asyncio.Task[None]] = set()

    def stalled_for(self) -> float:
        """Seconds since the upload under way last made progress (0 when none is).

        A stream that holds a slot and stops sending (a half-dead connection, or a hostile
        worker) would block every other upload, and a streamed one would hold its round open
        until the round timeout; the session's watchdog drops it.
        """
        return time.monotonic() - self._last_progress if self._watched else 0.0

    def too_slow(self, min_rate: float, grace: float) -> float | None:
        """The average rate (bytes/s) of the upload under way, when it has run for more than
        ``grace`` seconds below ``min_rate``; None otherwise.

        A trickle of one small chunk just inside the idle timeout never looks idle, yet holds
        the slot for the whole round: the watchdog drops such an upload too.
        """
        if not self._watched or min_rate <= 0:
            return None
        held = time.monotonic() - self._slot_since
        if held <= grace:
            return None
        rate = self._slot_bytes / held
        return rate if rate < min_rate else None

    async def drain(self) -> None:
        """Wait for the take-backs of streamed uploads still under way."""
        if self._aborts:
            await asyncio.gather(*self._aborts)

    def release(self) -> None:
        """Give back the upload slot (stream ended or upload done)."""
        self._watched = False
        if self._holding_slot:
            self._holding_slot = False
            self._slots.release()

    def _watch_from_now(self) -> None:
        self._watched = True
        self._last_progress = self._slot_since = time.monotonic()
        self._slot_bytes = 0

    async def handle(self, message: pb.WorkerMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            return
        if kind == "chunk":
            await self.on_chunk(message.chunk)
            return
        if kind == "secagg":
            if self._secagg is None:
                raise ProtocolError("a secure-aggregation message arrived, but it is off")
            self._secagg(self.session, message.secagg)
            return
        if kind == "analytics":
            if self._analytics is None:
                raise ProtocolError("an analytics message arrived, but analytics is off")
            self._analytics(self.session, message.analytics)
            return
        if self._upload is not None:
            raise ProtocolError(f"a {kind} message arrived in the middle of an upload")
        if kind == "result":
            _clean_result(message.result)
            await self._on_result(message.result)
        elif kind == "error":
            self._on_error(message.error)
        elif kind == "hello":
            raise ProtocolError("hello sent twice on one stream")
        else:
            raise ProtocolError("empty or unknown message")

    def _ticket_for(self, task_id: str) -> Ticket:
        ticket = self.session.ticket(task_id)
        if ticket is None:
            raise ProtocolError(f"result for task {task_id!r}, which this worker was not given")
        return ticket

    async def _on_result(self, result: pb.TaskResult) -> None:
        ticket = self._ticket_for(result.task_id)
        name = self.session.name
        collector = ticket.collector
        if ticket.kind == pb.TASK_KIND_EVALUATE:
            if result.HasField("update"):
                raise ProtocolError("an evaluation result must not carry an update")
            self.session.finish_ticket(ticket.task_id)
            if collector is not None and not ticket.stale:
                collector.check_result(result)
                await collector.accept(ticket, result, None)
            return
        if not result.HasField("update"):
            raise ProtocolError("a training result must carry an update")
        expected = self._signature
        if collector is not None:
            collector.check_result(result)
            expected = collector.update_signature or expected
        if result.update_kind != pb.UPDATE_KIND_MASKED:
            result.num_examples = bound_claimed_examples(
                name, ticket.round_number, result.num_examples, self.session.num_examples
            )
        header = result.update
        if ticket.stale:
            # Its round is over: check the framing only, and drop the chunks as they come.
            if (
                header.total_bytes > self._max_model_bytes
                or not 0 < header.chunk_bytes <= self._chunk_limit
            ):
                raise PayloadError(f"update from worker {name!r} has an invalid header")
            remaining = num_chunks(header.total_bytes, header.chunk_bytes)
            log.info(
                "worker %r answered round %d after it ended; its update is discarded",
                name,
                ticket.round_number,
                extra={"event": "late_answer", "worker": name, "round": ticket.round_number},
            )
            self._upload = _Upload(ticket, result, None, remaining)
        else:
            # Validate the header before waiting for a slot: a bad one is refused at once.
            try:
                assembler = PayloadAssembler(
                    header,
                    max_bytes=self._max_model_bytes,
                    max_chunk_bytes=self._chunk_limit,
                    expected=expected,
                    what=f"update from worker {name!r}",
                )
            except ModelMismatchError as exc:
                # Found by fuzzing: it is not a ProtocolError, so it ended the stream silently.
                raise PayloadError(str(exc)) from None
            sink = None
            if collector is not None:
                sink = collector.open_stream(ticket, result, assembler.signature)
            if sink is not None:
                self._watch_from_now()
                self._upload = _Upload(ticket, result, None, sink.expected_chunks, sink=sink)
                ticket.future.add_done_callback(lambda _: self._round_ended(ticket))
                if self._upload.remaining == 0:
                    await self._finish_upload()
                return
            await self._slots.acquire()
            self._holding_slot = True
            self._watch_from_now()
            self._upload = _Upload(ticket, result, assembler, assembler.expected_chunks)
            # The round may end (timeout, enough results) while this upload is under way:
            # give the slot back at once rather than when the last chunk trickles in.
            ticket.future.add_done_callback(lambda _: self._round_ended(ticket))
        if self._upload.remaining == 0:
            await self._finish_upload()

    async def on_chunk(self, chunk: ChunkLike) -> None:
        """Take the next chunk of the upload in progress."""
        self._last_progress = time.monotonic()
        self._slot_bytes += len(chunk.data)
        upload = self._upload
        if upload is None:
            raise ProtocolError("a payload chunk arrived outside of an upload")
        if upload.sink is not None:
            try:
                # numpy releases the GIL: the event loop serves other streams meanwhile.
                await asyncio.to_thread(upload.sink.add, chunk)
            except PayloadError as exc:
                # A bad chunk: take the upload's folded part back out, fail its worker.
                await self._take_back(upload)
                if upload.ticket.collector is not None:
                    upload.ticket.collector.fail(upload.ticket, str(exc))
                raise
        elif upload.assembler is not None:
            upload.assembler.add(chunk)
        elif chunk.index != upload.next_index:
            raise PayloadError(f"chunk {chunk.index} arrived, expected {upload.next_index}")
        upload.next_index += 1
        upload.remaining -= 1
        if upload.remaining == 0:
            await self._finish_upload()

    async def _take_back(self, upload: _Upload) -> None:
        """Take a streamed upload's folded part back out of the aggregate; later chunks are
        read and dropped."""
        sink, upload.sink = upload.sink, None
        self._watched = False  # the rest is read and dropped: it holds nothing up
        if sink is not None:
            await asyncio.to_thread(sink.abort)

    def _round_ended(self, ticket: Ticket) -> None:
        """``ticket`` resolved while its upload may still be under way (the round ended, the
        worker left or broke the protocol): if so, drop what was assembled (take a streamed
        upload back out), read the rest without keeping it, and free the slot."""
        upload = self._upload
        if upload is None or upload.ticket is not ticket:
            return
        if upload.sink is not None:
            task = asyncio.get_running_loop().create_task(self._take_back(upload))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)
            return
        if upload.assembler is None:
            return
        upload.assembler = None
        self.release()
        log.info(
            "round %d ended during worker %r's upload; its upload slot is free again",
            ticket.round_number,
            self.session.name,
        )

    async def _finish_upload(self) -> None:
        upload, self._upload = self._upload, None
        assert upload is not None
        try:
            self.session.finish_ticket(upload.ticket.task_id)
            collector = upload.ticket.collector
            if upload.sink is not None and collector is not None:
                await collector.finish_stream(upload.ticket, upload.result, upload.sink)
                return
            if upload.assembler is None or collector is None:
                return
            # Validation (finiteness) runs off the event loop; numpy releases the GIL.
            try:
                update = await asyncio.to_thread(upload.assembler.weights)
            except PayloadError as exc:
                collector.fail(upload.ticket, str(exc))
                raise
            await collector.accept(upload.ticket, upload.result, update)
        finally:
            self.release()

    def _on_error(self, error: pb.TaskError) -> None:
        ticket = self._ticket_for(error.task_id)
        error.message = printable(error.message)
        code = pb.ErrorCode.Name(error.code) if error.code in pb.ErrorCode.values() else "?"
        awaiting = error.code == pb.ERROR_CODE_AWAITING_APPROVAL
        refused = awaiting or error.code == pb.ERROR_CODE_REFUSED
        if refused:
            log.warning(
                "round %d: worker %r refused its task: %s",
                ticket.round_number,
                self.session.name,
                error.message,
                extra={
                    "event": "task_refused",
                    "round": ticket.round_number,
                    "worker": self.session.name,
                    "reason": error.message,
                },
            )
        else:
            log.warning(
                "round %d: worker %r could not run its task: %s (%s)",
                ticket.round_number,
                self.session.name,
                error.message,
                code,
            )
        self.session.finish_ticket(ticket.task_id)
        if ticket.collector is not None and not ticket.stale:
            reason = f"refused: {error.message}" if refused else f"worker error: {error.message}"
            ticket.collector.fail(ticket, reason, refused=refused, answered=True, awaiting=awaiting)
        if error.code == pb.ERROR_CODE_MODEL_MISMATCH:
            raise ProtocolError(f"worker cannot run the federation's model: {error.message}")


def _clean_result(result: pb.TaskResult) -> None:
    """Metric names made printable, non-finite values dropped (they reach tables and logs)."""
    if result.metrics:
        clean = clean_metrics(result.metrics)
        result.metrics.clear()
        result.metrics.update(clean)
