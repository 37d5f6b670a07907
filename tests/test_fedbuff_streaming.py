"""Issue 28: FedBuff uploads stream to disk as they arrive and fold at fold time.

* with one upload slot, an upload left open part-way does not stop another worker's upload
  from being folded and counted (uploads no longer wait for a slot);
* a streamed update folds bit for bit as the same update through ``accept`` (weights and
  deltas, staleness 0 and 2);
* an upload cut after any chunk leaves the next global model as if it was never sent, and
  its spool file is closed;
* a chunk with NaN or Inf is refused with a clear error and nothing is folded;
* uploads in flight hold O(chunk) memory each (their spools are on disk);
* through the in-process coordinator, a straggler's open upload does not hold up the updates.
"""

from __future__ import annotations

import asyncio
import os
import threading
import tracemalloc
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.codec import iter_chunks, make_header
from fedcore.errors import PayloadError
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.server.engine import fedbuff as fedbuff_engine
from fedcore.server.engine.fedbuff import BufferCollector
from fedcore.server.state.registry import SessionState, Ticket, WorkerSession
from fedcore.server.transport.inbox import Inbox
from fedcore.server.transport.upload_stream import StreamedUpload
from fedcore.strategy import AsyncSettings, FedBuff
from fedcore.strategy.spool import SpooledUpdate
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of
from fedcore.worker import FitOutput

RNG = np.random.default_rng(28)
# Three model versions: updates trained from version 0 arrive at version 2 (staleness 2).
V0: Weights = {
    "conv": RNG.normal(0, 0.1, (3, 5)).astype(np.float32),
    "steps": np.array([40, 7], np.int64),
    "big": RNG.normal(0, 0.1, 3000).astype(np.float32),
    "half": RNG.normal(0, 0.1, 9).astype(np.float64),
}
V2: Weights = {k: (v + np.asarray(1, v.dtype)).astype(v.dtype) for k, v in V0.items()}
SIGNATURE = signature_of(V0)
CHUNK = 1021  # odd: chunks cut float32, float64 and int64 elements in two
TOTAL = sum(a.nbytes for a in V0.values())
N_CHUNKS = -(-TOTAL // CHUNK)
STRATEGY = FedBuff(buffer_size=10, max_staleness=5, staleness_exponent=0.5)
WAIT = 5.0  # bound on every in-process step (each takes milliseconds)


def _update(seed: int, base: Weights) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype)
        if v.dtype.kind == "f"
        else v + rng.integers(-3, 4, v.shape)
        for k, v in base.items()
    }


def _collector(
    *, version: int = 2, bases: dict[int, Weights] | None = None, buffer_size: int = 10
) -> BufferCollector:
    """A buffer at model ``version`` (default: V2, models 0 and 2 still trained from).

    The engine is a stand-in holding what the collector reads of it: the version counter,
    the model versions and the settings."""
    bases = {0: V0, 2: V2} if bases is None else bases
    current = bases[version]
    engine: Any = SimpleNamespace(
        version=version,
        bases=bases,
        settings=AsyncSettings(buffer_size, STRATEGY.async_settings.max_staleness),
        context=SimpleNamespace(weights=current),
    )
    return BufferCollector(engine, STRATEGY.start_aggregation(version + 1, current))


def _ticket(collector: BufferCollector, name: str, *, trained_from: int) -> Ticket:
    session = WorkerSession(name, pb.Hello(name=name, num_examples=1000), "test")
    session.transition(SessionState.IDLE)
    ticket = Ticket(f"t-{name}", trained_from + 1, pb.TASK_KIND_FIT, session, collector=collector)
    session.assign(ticket)
    return ticket


def _result(
    ticket: Ticket, update: Weights, kind: pb.UpdateKind.ValueType = pb.UPDATE_KIND_WEIGHTS
) -> pb.TaskResult:
    return pb.TaskResult(
        task_id=ticket.task_id,
        num_examples=10,
        update=make_header(update, CHUNK),
        update_kind=kind,
    )


def _chunks(update: Weights) -> list[pb.PayloadChunk]:
    chunks = [
        pb.PayloadChunk(index=i, data=bytes(d)) for i, d in enumerate(iter_chunks(update, CHUNK))
    ]
    assert len(chunks) == N_CHUNKS
    return chunks


def _open(collector: BufferCollector, ticket: Ticket, result: pb.TaskResult) -> StreamedUpload:
    sink = collector.open_stream(ticket, result, SIGNATURE)
    assert isinstance(sink, StreamedUpload), "FedBuff must take uploads as streams"
    return sink


async def _stream(
    collector: BufferCollector, ticket: Ticket, update: Weights, kind: pb.UpdateKind.ValueType
) -> StreamedUpload:
    result = _result(ticket, update, kind)
    sink = _open(collector, ticket, result)
    for chunk in _chunks(update):
        await asyncio.to_thread(sink.add, chunk)
    await asyncio.wait_for(collector.finish_stream(ticket, result, sink), WAIT)
    return sink


def _bytes(weights: Weights) -> dict[str, bytes]:
    return {k: v.dtype.str.encode() + v.tobytes() for k, v in weights.items()}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch) -> list[SpooledUpdate]:
    """Every spool the collector makes, kept alive: a spool dropped without being closed
    would otherwise be closed by its finalizer and look freed."""
    made: list[SpooledUpdate] = []

    class Recorded(SpooledUpdate):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(fedbuff_engine, "SpooledUpdate", Recorded)
    return made


def _inbox(ticket: Ticket, slots: asyncio.Semaphore) -> Inbox:
    return Inbox(
        ticket.session,
        signature=SIGNATURE,
        max_model_bytes=4 * TOTAL,
        chunk_limit=CHUNK,
        upload_slots=slots,
    )


async def _concurrent_uploads() -> None:
    collector = _collector()
    slots = asyncio.Semaphore(1)  # the default --upload-slots
    slow = _ticket(collector, "slow", trained_from=2)
    fast = _ticket(collector, "fast", trained_from=0)
    slow_update, fast_update = _update(1, V2), _update(2, V0)
    slow_inbox, fast_inbox = _inbox(slow, slots), _inbox(fast, slots)
    slow_chunks = _chunks(slow_update)
    # The straggler announces its update and sends a third of it, then pauses.
    await asyncio.wait_for(
        slow_inbox.handle(pb.WorkerMessage(result=_result(slow, slow_update))), 1
    )
    for chunk in slow_chunks[: N_CHUNKS // 3]:
        await asyncio.wait_for(slow_inbox.on_chunk(chunk), 1)
    # Meanwhile another silo uploads its whole update: it is folded and counted at once.
    await asyncio.wait_for(
        fast_inbox.handle(pb.WorkerMessage(result=_result(fast, fast_update))), 1
    )
    for chunk in _chunks(fast_update):
        await asyncio.wait_for(fast_inbox.on_chunk(chunk), 1)
    assert await asyncio.wait_for(fast.future, WAIT) is True
    assert collector.aggregator.count == 1
    assert [r.staleness for r in collector.results] == [2]
    assert not slow.future.done()
    # The straggler goes on and is counted too.
    for chunk in slow_chunks[N_CHUNKS // 3 :]:
        await asyncio.wait_for(slow_inbox.on_chunk(chunk), 1)
    assert await asyncio.wait_for(slow.future, WAIT) is True
    assert sorted(r.staleness for r in collector.results) == [0, 2]
    # The same two updates through accept: the same global model.
    reference = _collector()
    for ticket, update in ((fast, fast_update), (slow, slow_update)):
        twin = _ticket(reference, ticket.session.name, trained_from=ticket.round_number - 1)
        await reference.accept(
            twin, _result(twin, update), {k: v.copy() for k, v in update.items()}
        )
    assert _bytes(collector.aggregator.result()) == _bytes(reference.aggregator.result())


def test_an_upload_left_open_does_not_block_another_silos_with_one_slot() -> None:
    asyncio.run(_concurrent_uploads())


@pytest.mark.parametrize("kind", [pb.UPDATE_KIND_WEIGHTS, pb.UPDATE_KIND_DELTA])
@pytest.mark.parametrize("trained_from", [2, 0])
def test_a_streamed_update_folds_bit_for_bit_as_an_accepted_one(
    kind: pb.UpdateKind.ValueType, trained_from: int
) -> None:
    base = V2 if trained_from == 2 else V0
    trained = _update(7, base)
    sent = (
        trained
        if kind == pb.UPDATE_KIND_WEIGHTS
        else {k: (v - base[k]).astype(v.dtype) for k, v in trained.items()}
    )
    first = _update(8, V2)  # one update already in the buffer, through accept

    async def run(streamed: bool) -> tuple[dict[str, bytes], list[int]]:
        collector = _collector()
        earlier = _ticket(collector, "earlier", trained_from=2)
        await collector.accept(
            earlier, _result(earlier, first), {k: v.copy() for k, v in first.items()}
        )
        ticket = _ticket(collector, "w", trained_from=trained_from)
        if streamed:
            await _stream(collector, ticket, sent, kind)
        else:
            copy = {k: v.copy() for k, v in sent.items()}
            await collector.accept(ticket, _result(ticket, sent, kind), copy)
        assert ticket.future.result() is True
        return _bytes(collector.aggregator.result()), [r.staleness for r in collector.results]

    streamed, accepted = asyncio.run(run(True)), asyncio.run(run(False))
    assert streamed == accepted
    assert streamed[1] == [0, 2 - trained_from]


def test_an_upload_completed_while_the_buffer_is_full_folds_onto_the_next_model() -> None:
    """Buffer of one: the first update fills it; the second upload completes before the
    engine made model 3, waits, and is then rebased onto model 3 with staleness 1, as
    ``accept`` would fold it there."""
    v3 = {k: (v + np.asarray(2, v.dtype)).astype(v.dtype) for k, v in V0.items()}
    late = _update(9, V2)

    async def streamed() -> tuple[dict[str, bytes], list[int]]:
        collector = _collector(buffer_size=1)
        await _stream(
            collector,
            _ticket(collector, "first", trained_from=2),
            _update(8, V2),
            pb.UPDATE_KIND_WEIGHTS,
        )
        assert collector.full.is_set()
        ticket = _ticket(collector, "late", trained_from=2)
        result = _result(ticket, late)
        sink = _open(collector, ticket, result)
        for chunk in _chunks(late):
            sink.add(chunk)
        folding = asyncio.create_task(collector.finish_stream(ticket, result, sink))
        for _ in range(10):  # let it run up to the buffer's gate (no threads before it)
            await asyncio.sleep(0)
        assert not folding.done()
        assert not ticket.future.done()
        # The engine makes model 3 (FedBuffEngine._apply) and opens the next buffer.
        collector.engine.version = 3
        collector.engine.bases[3] = v3
        collector.refill(STRATEGY.start_aggregation(4, v3), v3)
        await asyncio.wait_for(folding, WAIT)
        assert ticket.future.result() is True
        return _bytes(collector.aggregator.result()), [r.staleness for r in collector.results]

    async def accepted() -> tuple[dict[str, bytes], list[int]]:
        collector = _collector(version=3, bases={0: V0, 2: V2, 3: v3}, buffer_size=1)
        ticket = _ticket(collector, "late", trained_from=2)
        await collector.accept(
            ticket, _result(ticket, late), {k: v.copy() for k, v in late.items()}
        )
        return _bytes(collector.aggregator.result()), [r.staleness for r in collector.results]

    got, want = asyncio.run(streamed()), asyncio.run(accepted())
    assert got == want
    assert got[1] == [1]


def test_a_cut_at_any_chunk_leaves_the_next_model_as_without_it_and_frees_the_spool(
    spools: list[SpooledUpdate],
) -> None:
    kept, cut_update = _update(3, V0), _update(4, V2)

    async def run(cut: int | None) -> dict[str, bytes]:
        """``kept`` streamed, then ``cut_update`` through the inbox, cut after ``cut`` chunks
        (None: never sent; N_CHUNKS: every chunk sent, but its round was over first)."""
        collector = _collector()
        await _stream(
            collector, _ticket(collector, "kept", trained_from=0), kept, pb.UPDATE_KIND_WEIGHTS
        )
        if cut is not None:
            fds = _open_fds()
            ticket = _ticket(collector, "cut", trained_from=2)
            inbox = _inbox(ticket, asyncio.Semaphore(1))
            await inbox.handle(pb.WorkerMessage(result=_result(ticket, cut_update)))
            chunks = _chunks(cut_update)
            for chunk in chunks[: min(cut, N_CHUNKS - 1)]:
                await asyncio.wait_for(inbox.on_chunk(chunk), 1)
            if cut < N_CHUNKS:
                # What the registry does when the worker's stream ends (or its task times out).
                collector.fail(ticket, "connection lost")
                await asyncio.wait_for(inbox.drain(), WAIT)
            else:
                ticket.stale = True  # the federation ended: the engine marks tickets stale
                await asyncio.wait_for(inbox.on_chunk(chunks[-1]), WAIT)
            assert spools[-1].state in ("aborted", "closed"), f"cut at {cut}"
            assert _open_fds() == fds, f"the spool's file is still open (cut at {cut})"
            assert collector.aggregator.count == 1
            assert [r.worker.name for r in collector.results] == ["kept"]
        return _bytes(collector.aggregator.result())

    without = asyncio.run(run(None))
    for cut in range(N_CHUNKS + 1):
        assert asyncio.run(run(cut)) == without, f"cut after {cut} chunks"

    # Positive control: the same upload, completed, moves the model (and frees its spool).
    async def completed() -> dict[str, bytes]:
        collector = _collector()
        await _stream(
            collector, _ticket(collector, "kept", trained_from=0), kept, pb.UPDATE_KIND_WEIGHTS
        )
        fds = _open_fds()
        sink = await _stream(
            collector, _ticket(collector, "cut", trained_from=2), cut_update, pb.UPDATE_KIND_WEIGHTS
        )
        assert isinstance(sink.stream, SpooledUpdate)
        assert sink.stream.state == "closed"
        assert _open_fds() == fds
        assert collector.aggregator.count == 2
        return _bytes(collector.aggregator.result())

    assert asyncio.run(completed())["big"] != without["big"]


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_chunk_with_nan_or_inf_is_refused_and_nothing_folded(
    poison: float, spools: list[SpooledUpdate]
) -> None:
    async def run() -> None:
        collector = _collector()
        slots = asyncio.Semaphore(1)
        bad = _update(5, V2)
        bad["big"][2500] = poison
        ticket = _ticket(collector, "bad", trained_from=2)
        inbox = _inbox(ticket, slots)
        fds = _open_fds()
        await inbox.handle(pb.WorkerMessage(result=_result(ticket, bad)))
        chunks = _chunks(bad)
        # The chunk holding big[2500] ("big" follows "conv" and "steps" in the payload).
        poisoned = (15 * 4 + 2 * 8 + 2500 * 4) // CHUNK
        for chunk in chunks[:poisoned]:
            await asyncio.wait_for(inbox.on_chunk(chunk), 1)
        with pytest.raises(PayloadError, match=r"worker 'bad'.*'big' contains NaN or Inf"):
            await asyncio.wait_for(inbox.on_chunk(chunks[poisoned]), 1)
        await asyncio.wait_for(inbox.drain(), WAIT)
        assert ticket.future.result() is None  # failed, not counted
        assert spools[-1].state == "aborted"
        assert _open_fds() == fds  # its spool's file is closed
        assert len(collector.failures) == 1
        assert "NaN or Inf" in collector.failures[0].reason
        assert collector.aggregator.count == 0
        assert collector.results == []
        # Positive control: a clean update through the same harness is folded.
        clean = _update(5, V2)
        good = _ticket(collector, "good", trained_from=2)
        inbox = _inbox(good, slots)
        await inbox.handle(pb.WorkerMessage(result=_result(good, clean)))
        for chunk in _chunks(clean):
            await asyncio.wait_for(inbox.on_chunk(chunk), 1)
        assert good.future.result() is True
        assert collector.aggregator.count == 1

    asyncio.run(run())


def test_an_update_out_of_the_exact_sums_range_fails_its_worker_and_folds_nothing(
    spools: list[SpooledUpdate],
) -> None:
    async def run() -> None:
        collector = _collector()
        huge = _update(6, V2)
        huge["big"][7] = 1e15  # finite, but beyond the exact sum's 2**44 per term
        ticket = _ticket(collector, "huge", trained_from=2)
        with pytest.raises(PayloadError, match="range"):
            await _stream(collector, ticket, huge, pb.UPDATE_KIND_WEIGHTS)
        assert ticket.future.result() is None
        assert "range" in collector.failures[0].reason
        assert collector.aggregator.count == 0
        assert spools[-1].state == "closed"
        # Positive control: the same update in range is folded.
        huge["big"][7] = 1.0
        ok = _ticket(collector, "ok", trained_from=2)
        await _stream(collector, ok, huge, pb.UPDATE_KIND_WEIGHTS)
        assert ok.future.result() is True
        assert collector.aggregator.count == 1

    asyncio.run(run())


def test_uploads_in_flight_hold_o_chunk_memory_each_not_a_model() -> None:
    """Six uploads of an 8 MB model in flight at once, interleaved chunk by chunk: the
    coordinator allocates a few chunks, not the six models staging them whole would take
    (the spools are on disk). Reading one back, as its fold does, shows up as a model."""
    params, uploads, chunk = 2_000_000, 6, 1 << 18
    model: Weights = {"w": np.zeros(params, np.float32)}
    signature, model_bytes = signature_of(model), params * 4
    payloads = [
        [bytes(d) for d in iter_chunks({"w": np.full(params, i + 1.0, np.float32)}, chunk)]
        for i in range(uploads)
    ]

    sinks: list[StreamedUpload] = []

    async def open_all() -> None:
        engine: Any = SimpleNamespace(
            version=0,
            bases={0: model},
            settings=AsyncSettings(10, 5),
            context=SimpleNamespace(weights=model),
        )
        collector = BufferCollector(engine, STRATEGY.start_aggregation(1, model))
        for i in range(uploads):
            ticket = _ticket(collector, f"w{i}", trained_from=0)
            result = pb.TaskResult(
                task_id=ticket.task_id,
                num_examples=10,
                update=make_header(model, chunk),
                update_kind=pb.UPDATE_KIND_WEIGHTS,
            )
            sink = collector.open_stream(ticket, result, signature)
            assert isinstance(sink, StreamedUpload)
            sinks.append(sink)

    asyncio.run(open_all())
    tracemalloc.start()
    try:
        for index in range(len(payloads[0])):
            for sink, chunks in zip(sinks, payloads, strict=True):
                sink.add(pb.PayloadChunk(index=index, data=chunks[index]))
        _, in_flight = tracemalloc.get_traced_memory()
        spool = sinks[0].stream
        assert isinstance(spool, SpooledUpdate)
        assert spool.commit()
        back = spool.weights()
        _, read_back = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_flight < 4 * chunk, f"{in_flight / 2**20:.2f} MiB for {uploads} uploads in flight"
    # Positive control: the measurement sees a model read back whole.
    assert read_back >= model_bytes
    np.testing.assert_array_equal(back["w"], 1.0)
    for sink in sinks:
        sink.abort()  # what the inbox does when the stream ends
    spool.close()


class GatedTrainer(ScriptedTrainer):
    """Adds ``offset``; its first fit waits for ``gate`` (bounded by the test timeout)."""

    def __init__(self, offset: float, gate: threading.Event) -> None:
        super().__init__(offset, 10)
        self.gate = gate

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
        assert self.gate.wait(TIMEOUT), "the gate never opened"
        return super().fit(model, weights, config)


async def test_a_federation_goes_on_while_a_straggler_holds_its_upload_open(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    """Through the coordinator, one upload slot (the default): a worker sends a tenth of its
    update and stops; another trains two global updates meanwhile. With uploads staged in
    slots the second waited for the straggler's slot until the idle timeout (60 s here)."""
    strategy = FedBuff(buffer_size=1, staleness_exponent=0.0)
    cfg = config(rounds=2, heartbeat_timeout=60, upload_idle_timeout=60, upload_slots=1)
    coordinator, task = await coordinator_factory(cfg, strategy=strategy)
    straggler = raw_clients(coordinator.port)
    gate = threading.Event()
    fast = asyncio.create_task(run_worker(coordinator.port, "fast", GatedTrainer(1.0, gate)))
    await straggler.hello("straggler")
    handed, weights = await straggler.receive_task()
    header = make_header(weights, 1024)
    await straggler.send(
        pb.WorkerMessage(
            result=pb.TaskResult(
                task_id=handed.task_id,
                num_examples=10,
                update=header,
                update_kind=pb.UPDATE_KIND_WEIGHTS,
            )
        )
    )
    chunks = list(iter_chunks(weights, 1024))
    for i, data in enumerate(chunks[: len(chunks) // 10]):
        await straggler.send(pb.WorkerMessage(chunk=pb.PayloadChunk(index=i, data=data)))
    gate.set()  # the fast worker trains and uploads only now, behind the open upload
    result = await asyncio.wait_for(task, 15)
    await asyncio.wait_for(fast, TIMEOUT)
    assert [r.workers for r in result.rounds] == [1, 1]
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 2.0, atol=1e-5)
